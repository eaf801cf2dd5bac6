"""Which model an attack differentiates: the defense itself, a shorter surrogate chain, or BPDA.

The forward value an attack sees is always its target's logits; the defense that is scored
afterwards is always the full one. The modes:

- ``exact``: the defense itself (every reverse step, the forward jump, and with SSNI the score
  norm and the relaxed levels; :mod:`ssni.defense`).
- ``surrogate``: the paper's attack (SSNI authors' and Lee & Kim's code). The attack
  differentiates a copy of the defense whose purifier walks ``steps`` reverse steps per round
  from the same levels, with the same network, classifier, seed and votes, and whose SSNI
  levels are constants: the score norm and ``t(x)`` are recomputed without gradient on every
  call. On CIFAR-10 DiffPure (``t* = 100``, 100 steps) the authors attack through 20 steps:
  the grid ``100, 95, ..., 5, 0`` (:func:`ssni.purifiers.schedule.common_grid`).
- ``bpda``: the defense runs forward, its backward pass is the identity
  (:class:`ssni.attacks.bpda.BPDA`).

Randomness of the surrogate: it shares the defense's draw counter and per-sample streams, so
draw ``k`` of sample ``i`` uses the same score-norm noise (hence the same levels), the same
forward-jump noise and, for every reverse step that leaves a level both grids visit, the same
step noise as the defense's draw ``k``. The authors' code draws all of these afresh from the
global generator, and computes the score norm once per PGD iteration for all EOT samples;
ours recomputes it per draw (with the draw's own noise), which keeps draws independent and
results per-sample reproducible. Known differences: SSNI-N's ``reference_compat`` adds ``b``
reverse steps to the surrogate as to the defense (the authors' attack chain has exactly
``steps``), and GNS's reference surrogate merges its rounds (``30, 50, 125`` at ``1, 1, 5``
steps), which a per-round step count cannot express.
"""

from __future__ import annotations

from dataclasses import replace

import torch.nn.functional as F
from torch import Tensor, nn

from ..defense import SSNI, Defense
from ..errors import ConfigError
from ..purifiers.base import Purifier
from .bpda import BPDA
from .pgd import PGD

GRADIENT_MODES = ("exact", "surrogate", "bpda")
COSINE_DRAW = 9_000_000  # draws of the gradient-fidelity measurement, apart from evaluation draws


class DerivedDefense(Defense):
    """A defense made from ``defense``'s classifier with its own ``purifier`` and ``ssni``, sharing
    ``defense``'s seed, votes, resolution, training mode and draw counter. ``scored`` is ``defense``:
    the model an attack's results are judged on (for instance its choice among candidates)."""

    def __init__(self, defense: Defense, purifier: Purifier, ssni: SSNI | None):
        super().__init__(defense.classifier, purifier, ssni, seed=defense.seed, votes=defense.votes,
                         resolution=defense.resolution, image_size=defense.image_size, max_rows=defense.max_rows)
        self._parent = (defense,)  # a tuple: not registered as a submodule (no double .to/.eval walk)
        for module in (self, purifier, ssni):  # their own flags only: the networks stay in the mode they are in
            if module is not None:
                module.training = defense.training

    @property
    def scored(self) -> Defense:
        return self._parent[0]

    def reserve_draws(self, count: int) -> int:
        """Draws come from the defense's counter, so a run's draw numbers do not depend on the mode."""
        return self.scored.reserve_draws(count)


class SurrogateDefense(DerivedDefense):
    """``defense`` with ``steps`` reverse steps per round and levels computed without gradient.

    Shares every network and the draw counter with ``defense`` (see the module docstring).
    """

    def __init__(self, defense: Defense, steps: int):
        if steps < 1:
            raise ConfigError(f"surrogate_steps must be >= 1, found {steps}")
        ssni = None
        if defense.ssni is not None:
            s = defense.ssni
            ssni = SSNI(s.score_model, s.reweight, s.schedule, n_levels=s.n_levels, differentiable=False)
        super().__init__(defense, replace(defense.purifier, steps=steps), ssni)


def gradient_target(model: nn.Module, mode: str = "exact", surrogate_steps: int = 20) -> nn.Module:
    """The model whose input gradient an attack in gradient ``mode`` follows."""
    if mode not in GRADIENT_MODES:
        raise ConfigError(f"unknown gradient mode {mode!r}; choose one of {list(GRADIENT_MODES)}")
    if mode == "exact":
        return model
    if not isinstance(model, Defense):
        raise ConfigError(f"gradient = {mode!r} needs a purifier; [purifier] method is 'none' "
                          "(use gradient = 'exact')")
    return BPDA(model) if mode == "bpda" else SurrogateDefense(model, surrogate_steps)


def eot_gradient(target: nn.Module, x: Tensor, y: Tensor, ids: Tensor, first_draw: int, eot: int) -> Tensor:
    """Mean over draws ``first_draw ... first_draw + eot - 1`` of the input gradient of the summed
    cross-entropy, one fixed draw each: PGD's EOT estimate (:meth:`ssni.attacks.pgd.PGD.gradient`)."""
    return PGD(eot=eot).gradient(target, x, y, ids, first_draw=first_draw)[0]


def gradient_cosines(model: Defense, x: Tensor, y: Tensor, ids: Tensor,
                     modes: tuple[str, ...] = ("exact", "surrogate", "bpda"), eot: int = 4,
                     surrogate_steps: int = 20) -> dict[str, dict[str, float]]:
    """Per mode, the cosine similarity of its EOT gradient to the exact EOT gradient.

    Every mode uses the same ``eot`` draws as the exact reference (draws ``COSINE_DRAW ...``),
    except ``exact`` itself, which is re-estimated on ``eot`` other draws: its cosine is the
    agreement two independent exact estimates reach with this ``eot``, the ceiling a surrogate
    can be judged against. Cosines are per sample over all pixels; returns
    ``{mode: {"mean", "min", "eot", "n"}}``.
    """
    if not isinstance(model, Defense):
        raise ConfigError("gradient cosines need a Defense (a purifier is configured)")
    reference = eot_gradient(model, x, y, ids, COSINE_DRAW, eot).flatten(1)
    out = {}
    for mode in modes:
        first = COSINE_DRAW + eot if mode == "exact" else COSINE_DRAW
        grad = eot_gradient(gradient_target(model, mode, surrogate_steps), x, y, ids, first, eot).flatten(1)
        cos = F.cosine_similarity(grad, reference, dim=1, eps=1e-20)
        out[mode] = {"mean": float(cos.mean()), "min": float(cos.min()), "eot": eot, "n": x.shape[0]}
    return out


def cosine_checks(cosines: dict[str, dict[str, float]], surrogate_steps: int) -> list[dict]:
    """Sanity-report entries for :func:`gradient_cosines`. They describe how closely each mode follows
    the exact gradient and have no threshold (a low cosine is expected of BPDA and says nothing about
    the attack's strength, which the BPDA and budget checks judge), so they are ``informative``:
    ``passed`` is None and :func:`ssni.attacks.checks.all_passed` leaves them out."""
    return [{"check": f"gradient cosine to exact: {mode}" + (f" ({surrogate_steps} steps)" if mode == "surrogate"
                                                            else " (independent draws)" if mode == "exact" else ""),
             "passed": None, "informative": True,
             "detail": f"mean {c['mean']:.3f}, min {c['min']:.3f} over {c['n']} samples, EOT {c['eot']}", **c}
            for mode, c in cosines.items()]
