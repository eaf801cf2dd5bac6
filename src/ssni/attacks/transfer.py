"""Transfer attack: craft against plain DiffPure at the level SSNI gives the clean input.

SSNI's levels depend on the input; an attack through them must differentiate the score
network too. The transfer attack leaves that path out: for each sample it fixes the level
``t_i`` that SSNI gives the *clean* input ``x_i`` (the rounded mean over ``level_draws``
draws of :meth:`ssni.Defense.explain`), runs an attack (APGD or PGD) with exact gradients
against the same purifier at the constant level ``t_i`` (:class:`FixedLevelDefense`: same
networks, seed, votes, resolution, no score-norm pass), and returns the result, which the
caller scores on the full SSNI defense. ``clean_levels`` holds the fixed levels, ``levels``
those the adversarial inputs then receive from SSNI (mean over ``level_draws`` fresh draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..defense import Defense, Levels
from ..errors import ConfigError
from ..rng import SampleNoise, batch_ids
from ..validation import check_images
from .gradient_modes import DerivedDefense
from .pgd import PGD


class FixedLevelDefense(DerivedDefense):
    """``defense`` without SSNI, purifying sample ``i`` at the fixed levels ``fixed[i]`` (``[R]``).

    Shares the networks and the draw counter with ``defense``; the reverse plan of its reweighting
    (reference-compatible grids) is kept."""

    def __init__(self, defense: Defense, fixed: dict[int, Tensor]):
        super().__init__(defense, defense.purifier, None)
        self.fixed, self._ids = fixed, None

    def purify(self, x: Tensor, sample_ids: Tensor | None = None, draw: int | Tensor | None = None,
               vote: int = 0, width: int | None = None) -> tuple[Tensor, Levels]:
        self._ids = batch_ids(x, sample_ids, cpu=True)
        return super().purify(x, sample_ids, draw, vote, width)

    def levels(self, x: Tensor, noise: SampleNoise, max_rows: int | None = None) -> Levels:
        missing = [int(i) for i in self._ids if int(i) not in self.fixed]
        if missing:
            raise ConfigError(f"no fixed level for sample id(s) {missing[:5]}; the transfer attack fixes the "
                              "levels of the samples it attacks")
        t = torch.stack([self.fixed[int(i)] for i in self._ids], 1).to(x.device)  # [R, B]
        ssni = self.scored.ssni
        start, extra = ssni.reweight.reverse_plan(t)
        return Levels(t, None, None, start.clamp_max(ssni.schedule.num_levels), extra)


def mean_levels(defense: Defense, x: Tensor, ids: Tensor, draws: int) -> Tensor:
    """``[R, B]`` SSNI levels of ``x`` averaged over ``draws`` fresh draws of the defense."""
    first = defense.reserve_draws(draws)
    return torch.stack([defense.explain(x, ids, first + d)["t_star"] for d in range(draws)]).float().mean(0)


@dataclass
class TransferAttack:
    """Run ``attack`` against :class:`FixedLevelDefense` at the clean inputs' SSNI levels."""

    attack: PGD
    level_draws: int = 4
    clean_levels: Tensor | None = field(default=None, repr=False)
    levels: Tensor | None = field(default=None, repr=False)
    fooled_any_iterate: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.level_draws < 1:
            raise ConfigError(f"the transfer attack needs level_draws >= 1, found {self.level_draws}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        check_images(x)
        if not isinstance(model, Defense) or model.ssni is None:
            raise ConfigError("the transfer attack needs a Defense with SSNI ([ssni] reweight = 'sigmoid' | "
                              "'linear'); against plain purification use pgd or apgd")
        ids = batch_ids(x, sample_ids, cpu=True)
        self.clean_levels = mean_levels(model, x, ids, self.level_draws).round().long()
        surrogate = FixedLevelDefense(model, {int(i): self.clean_levels[:, j].clamp_min(1)
                                              for j, i in enumerate(ids)})
        x_adv = self.attack(surrogate, x.detach(), y, ids)
        self.fooled_any_iterate = None  # the crafting draws were not the scored defense's
        self.levels = mean_levels(model, x_adv, ids, self.level_draws)
        return x_adv
