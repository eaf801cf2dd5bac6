"""An SSNI-aware attack on a feasible set: fool the classifier while the input still looks clean.

SSNI gives an input with a low score norm ``e(x)`` little noise (METHOD §3), so the
weakness it adds is that adversarial inputs that *look* clean are purified less. The
attack restricts itself to the inputs the defense treats as clean,

    maximise   L(x) = mean over draws of loss(defense(x), y)      (APGD's DLR, margin or CE)
    subject to x in the ball B(x0, eps) and c(x) = (e(x) - e_target) / s <= 0,

where ``e_target`` is a score norm at which SSNI gives part of ``t*`` only
(:func:`feasible_target`; SSNI-N: ``mu`` gives half of ``t* - 1 + b``, ``mu + tau``
``sigmoid(1) = 73%`` of it) and ``s`` is a scale (SSNI-N: ``tau``). The constraint is
handled by a per-sample augmented Lagrangian (Nocedal & Wright, eq. 17.65): APGD
(schedule, momentum, checkpoints, restarts; :mod:`ssni.attacks.apgd`) ascends

    L_A(x; lambda) = L(x) - (relu(lambda + rho c(x))^2 - lambda^2) / (2 rho),

and after every gradient estimate each sample's multiplier moves to
``lambda <- max(0, lambda + rho c(x))`` with ``c`` averaged over that step's EOT draws.
Inside the feasible set with ``lambda = 0`` the attack is plain APGD on ``L``; outside
it the penalty's gradient pulls ``e(x)`` back down. Gradients are exact: the loss
flows through the classifier, the purifier at the levels SSNI picks and, via the
straight-through relaxed levels, through the score network; ``e(x)`` is the score
norm the defense computed in that same forward pass (``return_score_norm``), so
each forward runs the score network once, at the defense's ``resolution``.

The first run starts at the clean input (feasible when ``e(x0) <= e_target``); run
``r > 0`` starts at a random point of the ball of radius ``eps r / restarts``. The
``shortlist`` iterates of highest ``L`` among those that met the constraint on the
attack's own draws (and the clean start) are re-scored on ``heldout_draws`` fresh
draws the gradient never used, on the defense that is scored (with ``gradient =
"surrogate"``, the full defense, not the surrogate chain the gradient came from:
``model.scored``). The output is the held-out-feasible candidate with
the most misclassified held-out draws (ties: highest mean margin); when no candidate
is feasible on held-out draws, the best-scoring one. ``levels`` (``[R, B]``, mean over
held-out draws), ``score_norms`` and ``feasible`` record what the defense does with
each output.

Measured on the MNIST demo (DiffPure t* = 300, 10 steps, SSNI-N; l_inf 0.3; 10 steps,
EOT 2; 32 images, worst of 8 fresh draws): val 93.8% robust [79.9, 98.3], test 87.5%
(PGD and APGD-DLR: 9.4% on both). The feasible set is nearly empty of useful points there:
``e_target = mu + tau = 488.6`` while clean inputs average 473, and along the segment from
a clean image to its PGD example ``e`` passes the target by ``l_inf = 0.015`` (e = 595,
level 301 of 304); PGD's examples sit at e = 1440 and get the full level 304, yet fool.
Sign descent on ``e`` alone can lower it (step 0.003: level 153 -> 36), so low-score-norm
points exist, but not ones that also fool the classifier within 10 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..defense import Defense
from ..errors import ConfigError
from ..reweight import LinearReweight, Reweight
from ..rng import SampleNoise, batch_ids
from ..validation import check_images
from .apgd import APGD, LOSSES, margin_loss
from .base import ThreatModel

TARGETS = ("mu", "mu+tau", "clean")
SIGMOID_ONE = 1 / (1 + math.exp(-1))  # share of the sigmoid's range at mu + tau


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def feasible_target(reweight: Reweight, target: str | float) -> tuple[float | None, float | None]:
    """``(e_target, scale)`` for a reweighting; ``None`` where they must come from the clean inputs.

    ``"mu"``: where SSNI gives half of its range (SSNI-N: the clean mean; SSNI-L: the middle
    of ``[e_min, e_max]``); ``"mu+tau"``: where it gives ``sigmoid(1)`` of it (SSNI-N:
    ``mu + tau``; SSNI-L: ``e_min + 0.73 (e_max - e_min)``); a number: that score norm;
    ``"clean"``: each input's own clean score norm. A reweighting without a calibration
    (a :class:`ssni.reweight.CallableReweight`) falls back to ``"clean"`` unless given a number.
    """
    cal = getattr(reweight, "calibration", None)
    scale = None if cal is None else (getattr(reweight, "tau", None) or cal.std)
    value = _number(target)
    if value is not None:
        return value, scale
    if target not in TARGETS:
        raise ConfigError(f"adaptive attack: score_target = {target!r}; choose one of {list(TARGETS)} "
                          "or a score norm (a number)")
    if target == "clean" or cal is None:
        return None, None
    if isinstance(reweight, LinearReweight):
        share = 0.5 if target == "mu" else SIGMOID_ONE
        return cal.min + share * (cal.max - cal.min), cal.std
    return cal.mean + (0.0 if target == "mu" else scale), scale


@dataclass
class AdaptiveAttack(APGD):
    """APGD on the feasible set ``e(x) <= e_target`` of a :class:`ssni.Defense` with SSNI.

    Attributes (besides APGD's; ``restarts``, ``targeted``, ``loss`` work as there):
        score_target: ``"mu"``, ``"mu+tau"`` (default), ``"clean"`` or a number (:func:`feasible_target`).
        penalty: ``rho`` of the augmented Lagrangian (per unit of ``c``).
        tolerance: slack on the constraint, in units of the scale ``s``.
        shortlist: iterates per sample re-scored on held-out draws (plus the clean start).
        heldout_draws: fresh draws for that choice.
    """

    score_target: str | float = "mu+tau"
    penalty: float = 1.0
    tolerance: float = 0.0
    shortlist: int = 3
    heldout_draws: int = 2
    levels: Tensor | None = field(default=None, repr=False)
    score_norms: Tensor | None = field(default=None, repr=False)
    feasible: Tensor | None = field(default=None, repr=False)
    e_target: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not self.penalty > 0 or self.tolerance < 0 or self.shortlist < 1 or self.heldout_draws < 1:
            raise ConfigError("the adaptive attack needs penalty > 0, tolerance >= 0, shortlist >= 1 and "
                              f"heldout_draws >= 1, found {self.penalty}, {self.tolerance}, "
                              f"{self.shortlist}, {self.heldout_draws}")
        if _number(self.score_target) is None and self.score_target not in TARGETS:
            raise ConfigError(f"adaptive attack: score_target = {self.score_target!r}; choose one of "
                              f"{list(TARGETS)} or a score norm (a number)")

    def objective(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None,
                  draw: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``([rows] L_A, logits)``; the score norm is the one the defense's forward pass computed."""
        logits, e = model(x, sample_ids=sample_ids, draw=draw, return_score_norm=True)
        k = logits.shape[0] // self._lam.shape[0]
        t = None if self._target is None else self._target.repeat(k)
        adv = LOSSES[self.loss](logits, y, t)
        c = (e - self.e_target.repeat(k)) / self._scale.repeat(k)
        lam = self._lam.repeat(k)
        self._rows.append((adv.detach().reshape(k, -1), e.detach().reshape(k, -1)))
        return adv - (torch.relu(lam + self.penalty * c) ** 2 - lam ** 2) / (2 * self.penalty), logits

    def _estimate(self, model: nn.Module, x: Tensor, y: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """APGD's estimate; then the multiplier update and the candidate bookkeeping at ``x``."""
        self._rows = []
        grad, loss = super()._estimate(model, x, y, ids)
        adv = torch.cat([a for a, _ in self._rows]).mean(0)
        e = torch.cat([e for _, e in self._rows]).mean(0)
        c = (e - self.e_target) / self._scale
        self._lam = (self._lam + self.penalty * c).clamp_min(0)
        self._remember(x, torch.where(c <= self.tolerance, adv, adv - 1e6))
        return grad, loss

    def _remember(self, x: Tensor, key: Tensor, slot: int | None = None) -> None:
        """Keep ``x`` in the candidate slot of lowest key when its key is higher (slot 0: the clean start)."""
        rows = torch.arange(x.shape[0], device=x.device)
        if slot is None:
            worst = self._keys[1:].argmin(0) + 1
            take = key > self._keys[worst, rows]
        else:
            worst, take = torch.full_like(rows, slot), torch.ones_like(key, dtype=torch.bool)
        self._xs[worst[take], rows[take]] = x[take].detach()
        self._keys[worst[take], rows[take]] = key[take]

    def _check(self, model: nn.Module) -> Defense:
        if not isinstance(model, Defense) or model.ssni is None:
            raise ConfigError("the adaptive attack needs a Defense with SSNI ([ssni] reweight = 'sigmoid' | "
                              "'linear'); use pgd or apgd for other defenses")
        return model

    def _set_target(self, model: Defense, x: Tensor, ids: Tensor) -> None:
        """``e_target`` and ``scale`` per sample; from the clean inputs' score norms where needed."""
        value, scale = feasible_target(model.ssni.reweight, self.score_target)
        clean = None
        if value is None or scale is None:
            first = model.reserve_draws(self.heldout_draws)
            clean = torch.stack([model.explain(x, ids, first + d)["score_norm"]
                                 for d in range(self.heldout_draws)]).mean(0)
        self.e_target = clean if value is None else torch.full((x.shape[0],), value, device=x.device)
        self._scale = (0.05 * self.e_target.abs()).clamp_min(1e-8) if scale is None else \
            torch.full_like(self.e_target, scale)

    def _start(self, x: Tensor, ids: Tensor, restart: int) -> Tensor:
        if restart == 0:
            return x
        ball = ThreatModel(self.threat.norm, self.threat.eps * restart / self.restarts)
        return self.threat.project(ball.random_point(x, SampleNoise.from_ids(self.seed, ids, restart)), x)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        check_images(x)
        model, x = self._check(model), x.detach()
        ids = batch_ids(x, sample_ids, cpu=True)
        self.loss_trace, self.step_trace = [], []
        self.fooled_any_iterate = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self._set_target(model, x, ids)
        self._xs = x.unsqueeze(0).repeat(self.shortlist + 1, *[1] * x.dim())
        self._keys = torch.full((self.shortlist + 1, x.shape[0]), float("-inf"), device=x.device)
        self._remember(x, torch.zeros(x.shape[0], device=x.device), slot=0)
        try:
            for target in self._targets(model, x, y, ids):
                self._target = target
                for restart in range(self.restarts):
                    self._lam = torch.zeros(x.shape[0], device=x.device)
                    self._run(model, x, y, ids, self._start(x, ids, restart))
        finally:
            self._target, self._rows = None, []
        return self._select(getattr(model, "scored", model), y, ids)  # chosen on the defense that is scored

    def _heldout(self, model: Defense, x: Tensor, y: Tensor, ids: Tensor,
                 first: int) -> tuple[Tensor, Tensor]:
        """``(score [B], score norms [draws, B])`` on held-out draws: share of misclassified draws,
        ties broken by the mean margin."""
        wrong, margin, norms = 0.0, 0.0, []
        with torch.no_grad():
            for d in range(self.heldout_draws):
                logits, e = model(x, sample_ids=ids, draw=first + d, return_score_norm=True)
                wrong = wrong + (logits.argmax(1) != y).float()
                margin = margin + margin_loss(logits, y, None)
                norms.append(e)
        n = self.heldout_draws
        return wrong / n + 0.01 * torch.tanh(margin / n), torch.stack(norms)

    def _select(self, model: Defense, y: Tensor, ids: Tensor) -> Tensor:
        """The output per sample among the candidates (module docstring); sets ``levels`` and co."""
        first = model.reserve_draws(self.heldout_draws)
        results = [self._heldout(model, cand, y, ids, first) for cand in self._xs]
        scores = torch.stack([s for s, _ in results])  # [K, B]
        norms = torch.stack([e for _, e in results])  # [K, draws, B]
        ok = norms.mean(1) <= self.e_target + self.tolerance * self._scale
        best = torch.where(ok, scores, scores - 10).argmax(0)
        rows = torch.arange(len(y), device=y.device)
        chosen = norms[best, :, rows].T  # [draws, B]
        reweight, top = model.ssni.reweight, model.ssni.schedule.num_levels
        per_draw = [torch.stack([reweight.levels(e, t, top)[0] for e in chosen])
                    for t in model.purifier.t_stars]  # R x [draws, B]
        self.levels = torch.stack(per_draw).float().mean(1)  # [R, B]
        self.score_norms, self.feasible = chosen.mean(0), ok[best, rows]
        return self._xs[best, rows].detach()
