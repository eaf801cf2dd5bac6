"""GDMP, guided diffusion model purification (Wang et al., 2022).

DDPM reverse steps whose mean is pulled toward the round's input diffused to
the same level (MSE guidance):

    x_c = mu(x_a) + var_a * s_a * grad_{x_a}[-MSE(x_a, y_a)] + sqrt(var_a) z,
    y_a = sqrt(abar_a) x_in + sqrt(1 - abar_a) z',
    s_a = sqrt(1 - abar_a) / (m sqrt(abar_a)),  m = (8 * 2/255) / 3 / guide_scale.

The MSE is a per-sample mean over pixels, so its gradient ``-2 (x_a - y_a) / D``
is closed-form and a sample's guidance does not depend on its batch partners
(the reference code averages over the whole batch). Defaults on CIFAR-10:
``t* = 36`` per round, 4 rounds, ``guide_scale = 60000``, unit steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..diffusion import broadcast_to, forward_jump
from ..rng import SampleNoise
from .base import Purifier, check_positive_levels


@dataclass
class GDMP(Purifier):
    t_star: int = 36
    rounds: int = 4
    guide_scale: float = 60000.0
    steps: int | None = None

    def __post_init__(self):
        check_positive_levels("GDMP", (self.t_star,) * self.rounds, self.schedule)

    @property
    def t_stars(self) -> tuple[int, ...]:
        return (self.t_star,) * self.rounds

    def reverse_step(self, x_a: Tensor, a: Tensor, c: Tensor, idx: Tensor, *, noise: SampleNoise,
                     round_: int, x_in: Tensor) -> Tensor:
        rows = noise.subset(idx)
        x_c, c1 = self.denoise_step(x_a, a, c, rows.randn_levels(("reverse", round_), a, x_a), 1.0)
        # The guidance target: this round's input diffused to level a with its own noise.
        y_a = forward_jump(self.schedule, x_in[idx], a, rows.randn_levels(("guide", round_), a, x_a))
        grad = -2 * (x_a - y_a) / x_a[0].numel()
        abar_a = broadcast_to(self.schedule.abar(a, like=x_a), x_a)
        m = (8 * 2 / 255) / 3 / self.guide_scale
        s_a = (1 - abar_a).sqrt() / (m * abar_a.sqrt())
        return x_c + c1**2 * s_a * grad
