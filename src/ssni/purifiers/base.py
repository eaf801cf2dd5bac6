"""Purifier: rounds of (forward jump to per-sample levels, reverse chain back to 0).

DiffPure is one round, GDMP several rounds at the same level with a guided
step, GNS several rounds at growing levels. A subclass only names its rounds
(``t_stars``) and its reverse step; batching, per-sample randomness, input
checks and the ``[0, 1] <-> [-1, 1]`` maps live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import torch
from torch import Tensor

from ..denoisers.protocol import EpsModel, eps_to_x0
from ..diffusion import VPSchedule, broadcast_to, forward_jump, to_image_scale, to_model_scale
from ..errors import ConfigError, InputError
from ..rng import SampleNoise
from ..validation import check_images
from .sde import sde_step
from .schedule import common_grid, run_common_length, run_join_when_due, unique_grid

Scheduler = Literal["join", "common"]
Solver = Literal["ddpm", "sde"]
SOLVERS = ("ddpm", "sde")
GridFn = Callable[[int, int | None], list[int]]  # (t, n) -> one sample's descending levels


@dataclass
class Purifier:
    """Shared machinery; see :class:`DiffPure`, :class:`GDMP`, :class:`GNS`.

    Attributes:
        model: epsilon network in the project protocol.
        schedule: its VP schedule.
        steps: reverse grid length ``n`` per round (``None``: unit steps, full DDPM).
        clip_x0: clip ``x0_hat`` to ``[-1, 1]`` in every step (as guided-diffusion's
            ``clip_denoised``) and re-derive ``eps_hat`` from the clipped ``x0_hat``, so the
            step mean is the posterior mean of the clipped estimate. Off by default: neither
            the SSNI authors' DiffPure nor Lee & Kim's GNS clips; GDMP does.
        solver: ``"ddpm"`` (generalised DDPM/DDIM step) or ``"sde"`` (Euler-Maruyama step of
            the reverse VP-SDE, DiffPure's own solver; see :mod:`.sde`).
        scheduler: ``"join"`` (skip repeated levels, cost ``sum_i min(n, t_i)``) or
            ``"common"`` (the authors' ``B * n`` scheme; same output, for reference).
        checkpoint: activation checkpointing over reverse steps when gradients are on.
        eta: ``1`` for DDPM ancestral steps, ``0`` for deterministic DDIM steps.
    """

    model: EpsModel
    schedule: VPSchedule = VPSchedule()
    steps: int | None = None
    clip_x0: bool = False
    solver: Solver = "ddpm"
    scheduler: Scheduler = "join"
    checkpoint: bool = False
    eta: float = 1.0

    @property
    def t_stars(self) -> tuple[int, ...]:
        """The base method's constant level of each round."""
        raise NotImplementedError

    def reverse_step(self, x_a: Tensor, a: Tensor, c: Tensor, idx: Tensor, *, noise: SampleNoise,
                     round_: int, x_orig: Tensor) -> Tensor:
        """One reverse step of rows ``idx`` from levels ``a`` to ``c`` (unguided by default).

        ``x_orig`` is the purifier's input in model scale (GDMP's guidance target).
        """
        # Each sample's noise for the step leaving level a is its own, keyed by (round, a).
        z = noise.subset(idx).randn_levels(("reverse", round_), a, x_a)
        if self.solver == "sde":
            return sde_step(self.model, self.schedule, x_a, a, c, z)
        return self.denoise_step(x_a, a, c, z, self.eta)[0]

    def jump_levels(self, t: Tensor) -> Tensor:
        """Levels ``[B]`` the forward jump reaches for grids that start at ``t`` (``t`` itself)."""
        return t

    def check_solver(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown purifier solver {self.solver!r}; choose one of {list(SOLVERS)}")

    def default_levels(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """``[R, B]`` levels of the base method (every sample at ``t*``)."""
        return torch.tensor(self.t_stars, device=device).unsqueeze(1).repeat(1, batch)

    def purify(self, x: Tensor, t: Tensor | None, noise: SampleNoise, *, t_relaxed: Tensor | None = None,
               start: Tensor | None = None, extra_steps: int = 0, width: int | None = None) -> Tensor:
        """Purify ``x: [B, C, H, W]`` in ``[0, 1]`` at levels ``t`` -> ``[B, C, H, W]`` in ``[0, 1]``.

        Args:
            t: ``[B]`` integer levels (every round at that level) or ``[R, B]`` (one row per
                round); ``None`` for the base method's constant ``t*``.
            noise: per-sample noise streams (:class:`ssni.rng.SampleNoise`).
            t_relaxed: real-valued levels shaped like ``t`` that carry a gradient into the
                forward jump (straight-through; see :func:`ssni.diffusion.forward_jump`).
            start: levels the reverse grids start from, shaped like ``t`` (default ``t``). A
                sample's grid is its level-``t`` grid shifted up by ``start - t``, then a jump to
                0: SSNI-L's ``reference_compat`` (``start = t + b``; at ``t = 20``, ``b = 5``,
                unit steps: ``25, 24, ..., 6, 0``).
            extra_steps: added to ``steps`` (SSNI-N's ``reference_compat`` uses ``steps + b``).
            width: most rows per network call; a larger batch is purified by continuous
                batching (a finished sample's row goes to the next one), which keeps calls full.
                ``None``: the whole batch. Results do not depend on it.

        Host reads: the image check (none inside :func:`ssni.validation.trusted_images`), the level
        check (none inside :func:`ssni.diffusion.trusted_levels`: a :class:`ssni.Defense` makes both
        checks before it calls this), and one read of the levels for the reverse grids, none for the
        base method's levels (``t`` and ``start`` ``None``). No read in a reverse step.
        """
        check_images(x)
        t, start, t_relaxed, on_host = self._checked_levels(x, t, noise, start, t_relaxed)
        n = None if self.steps is None else self.steps + extra_steps
        run, grid_fn = self._chain_runner(width)
        x_orig = x_model = to_model_scale(x)
        for r in range(t.shape[0]):
            # One round: forward jump to each sample's level, then its reverse chain back to 0.
            eps = noise.randn(("forward", r), x_model)
            x_t = forward_jump(self.schedule, x_model, self.jump_levels(t[r]), eps,
                               None if t_relaxed is None else t_relaxed[r])
            grids = self._round_grids(*on_host[r], n, grid_fn)
            step = partial(self.reverse_step, noise=noise, round_=r, x_orig=x_orig)
            x_model = run(x_t, grids, step, self.checkpoint)
        untouched = broadcast_to((t == 0).all(0), x).bool()
        return torch.where(untouched, x, to_image_scale(x_model))

    def _checked_levels(self, x: Tensor, t: Tensor | None, noise: SampleNoise, start: Tensor | None,
                        t_relaxed: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, list]:
        """``purify``'s levels as ``[R, B]`` (``t``, ``start``, ``t_relaxed``), once they and ``noise`` are
        checked against the batch, and per round ``(t, start)`` as lists on the host for the reverse
        grids: one read for all rounds, none for the base method's levels (known on the host)."""
        batch = x.shape[0]
        if len(noise) != batch:
            raise InputError(f"{len(noise)} noise streams for a batch of {batch} images")
        constant = t is None and start is None
        t = self._levels(t, batch, x.device)
        start = t if start is None else self._levels(start, batch, x.device)
        t_relaxed = None if t_relaxed is None else t_relaxed.reshape(t.shape)
        on_host = ([([t_r] * batch,) * 2 for t_r in self.t_stars] if constant
                   else list(zip(*torch.stack([t, start]).tolist())))
        return t, start, t_relaxed, on_host

    def _chain_runner(self, width: int | None) -> tuple[Callable[..., Tensor], GridFn]:
        """The chain runner and the grid builder of ``self.scheduler`` (see :mod:`.schedule`)."""
        if width is not None and self.scheduler != "join":
            raise InputError("width applies to the join scheduler only")
        if self.scheduler == "join":
            return partial(run_join_when_due, width=width), unique_grid
        return run_common_length, common_grid

    def _round_grids(self, t_r: list[int], start_r: list[int], n: int | None, grid_fn: GridFn) -> list[list[int]]:
        """Each sample's descending reverse grid for one round: ``n`` steps from level ``t_r``, shifted up
        to start at ``start_r``."""
        # Unit steps on the common-length scheme: one grid of the longest chain's length.
        n_r = max(t_r) if n is None and self.scheduler == "common" else n
        return [shifted_grid(grid_fn(ti, n_r), si - ti) for ti, si in zip(t_r, start_r)]

    def _levels(self, t: Tensor | None, batch: int, device: torch.device | str = "cpu") -> Tensor:
        if t is None:
            return self.default_levels(batch, device)
        if not isinstance(t, Tensor) or t.dim() not in (1, 2):
            raise InputError("levels must be a [B] or [R, B] integer tensor")
        rows = t.reshape(-1, t.shape[-1])
        checked = torch.stack([self.schedule.check_levels(row, batch) for row in rows])
        if checked.shape[0] == 1:
            return checked.repeat(len(self.t_stars), 1)
        if checked.shape[0] != len(self.t_stars):
            raise InputError(f"{type(self).__name__} has {len(self.t_stars)} rounds, found "
                             f"levels for {checked.shape[0]}")
        return checked

    def denoise_step(self, x_a: Tensor, a: Tensor, c: Tensor, z: Tensor, eta: float) -> tuple[Tensor, Tensor]:
        """Generalised DDPM/DDIM step from level ``a`` to ``c < a`` (METHOD §1).

        ``x_c = sqrt(abar_c) x0_hat + c1 z + c2 eps_hat``, ``c1 = eta sqrt((1 - abar_a/abar_c)
        (1 - abar_c) / (1 - abar_a))``, ``c2 = sqrt(1 - abar_c - c1^2)``. Returns ``(x_c, c1)``.
        """
        eps_hat = self.model(x_a, a)
        x0_hat = eps_to_x0(self.schedule, x_a, a, eps_hat)
        abar_a = broadcast_to(self.schedule.abar(a, like=x_a), x_a)
        if self.clip_x0:  # eps_hat consistent with the clipped x0_hat: the mean is q(x_c | x_a, x0_hat)'s
            x0_hat = x0_hat.clamp(-1, 1)
            eps_hat = (x_a - abar_a.sqrt() * x0_hat) / (1 - abar_a).sqrt()
        abar_c = broadcast_to(self.schedule.abar(c, like=x_a), x_a)
        c1 = eta * ((1 - abar_a / abar_c) * (1 - abar_c) / (1 - abar_a)).clamp_min(0).sqrt()
        c2 = (1 - abar_c - c1**2).clamp_min(0).sqrt()
        return abar_c.sqrt() * x0_hat + c1 * z + c2 * eps_hat, c1


def shifted_grid(grid: list[int], shift: int) -> list[int]:
    """``grid`` (descending, ending at 0) with every level but the final 0 raised by ``shift``."""
    if shift == 0 or grid[0] == 0:  # no chain (t = 0) stays no chain
        return grid
    return [g + shift for g in grid[:-1]] + [0]


def check_positive_levels(name: str, levels: tuple[int, ...], schedule: VPSchedule) -> None:
    if not levels or any(not 0 < t <= schedule.num_levels for t in levels):
        raise ConfigError(f"{name} levels must lie in 1..{schedule.num_levels}, found {list(levels)}")
