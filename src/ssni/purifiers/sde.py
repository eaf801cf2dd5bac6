"""DiffPure's own reverse solver: Euler-Maruyama on the reverse VP-SDE.

The forward VP-SDE (Song et al., 2021) on time ``s in [0, 1]`` is
``dx = -0.5 beta(s) x ds + sqrt(beta(s)) dw`` with ``beta(s) = b0 + s (b1 - b0)``,
``b0 = 0.1``, ``b1 = 20`` (the continuous twin of the DDPM schedule, ``s = t / T``).
Its reverse runs ``s`` downward:
``dx = [-0.5 beta(s) x - beta(s) score(x, s)] ds + sqrt(beta(s)) dw_bar``.

DiffPure (Nie et al., ICML 2022) integrates it with Euler-Maruyama, ``dt = 1/1000``,
from ``s = t*/1000`` down to ``s = 1e-5``, with the score from the epsilon network
divided by the *continuous* ``sqrt(1 - abar(s))``. On integer levels that is one
step per level; the final step stops at ``s = 1e-5`` (level ``0.01``), whose state
is the purified image.
"""

from __future__ import annotations

from torch import Tensor

from ..denoisers.protocol import EpsModel
from ..diffusion import VPSchedule, broadcast_to

END_LEVEL = 0.01  # DiffPure stops at s = 1e-5, i.e. level 1e-5 * T for T = 1000


def sde_step(model: EpsModel, schedule: VPSchedule, x_a: Tensor, a: Tensor, c: Tensor, z: Tensor) -> Tensor:
    """One Euler-Maruyama step of the reverse VP-SDE from levels ``a`` to ``c < a`` (``[B]``).

    ``x_c = x_a + dt [0.5 beta(s_a) x_a + beta(s_a) score(x_a, s_a)] + sqrt(beta(s_a) dt) z``,
    ``s_a = a / T``, ``dt = s_a - s_c``, ``score = -eps_theta(x_a, a) / sqrt(1 - abar(s_a))``;
    level 0 stands for ``s = 1e-5`` as in DiffPure. Differentiable in ``x_a``.
    """
    T = schedule.num_levels
    s_a = a.to(x_a.dtype) / T
    s_c = c.to(x_a.dtype).clamp_min(END_LEVEL) / T
    b0, b1 = schedule.beta_start * T, schedule.beta_end * T
    beta = broadcast_to(b0 + s_a * (b1 - b0), x_a)
    dt = broadcast_to(s_a - s_c, x_a)
    std = broadcast_to((1 - schedule.abar_continuous(a.to(x_a.dtype))).sqrt(), x_a)
    score = -model(x_a, a) / std
    return x_a + dt * (0.5 * beta * x_a + beta * score) + (beta * dt).sqrt() * z
