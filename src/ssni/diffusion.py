"""Variance-preserving (VP) diffusion maths, with no network in it.

Discrete DDPM schedule (Ho et al., 2020): ``T = 1000`` levels, ``beta`` linear
from ``1e-4`` to ``0.02``, ``abar[t] = prod_{s<=t} (1 - beta[s])`` for a level
``t`` in ``1..T``; level ``0`` is the clean image (``abar = 1``). Its continuous
twin (Song et al., 2021, VP-SDE) is ``abar(s) = exp(-0.5 (b1 - b0) s^2 - b0 s)``
with ``s = t / T``, ``b0 = 0.1``, ``b1 = 20``.

Noise levels always travel as ``[B]`` tensors so that every sample of a batch
can sit at its own level.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError


@dataclass(frozen=True)
class VPSchedule:
    """The DDPM linear-beta schedule and its continuous VP-SDE twin.

    Attributes:
        num_levels: ``T``, the number of discrete noise levels.
        beta_start: first ``beta`` (at level 1).
        beta_end: last ``beta`` (at level ``T``).
    """

    num_levels: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @property
    def betas(self) -> Tensor:
        """``beta[t]`` for ``t = 0..T`` (float64, ``beta[0] = 0``)."""
        inner = torch.linspace(self.beta_start, self.beta_end, self.num_levels, dtype=torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), inner])

    @property
    def abar_table(self) -> Tensor:
        """``abar[t]`` for ``t = 0..T`` (float64, ``abar[0] = 1``)."""
        return self.abar_on(torch.device("cpu"))

    def abar_on(self, device: torch.device) -> Tensor:
        """:attr:`abar_table` on ``device``, computed and copied there once per schedule and device
        (a copy per reverse step would wait for the GPU's queue)."""
        return _abar_table(self.num_levels, self.beta_start, self.beta_end, torch.device(device))

    def check_levels(self, t: Tensor, batch: int | None = None, low: int = 0) -> Tensor:
        """Validate integer levels ``t: [B]`` in ``low..T`` and return them as int64 (one host sync
        for a valid integer tensor: the range is read back only when it is wrong). Inside
        :func:`trusted_levels` only the shape is checked: no host read."""
        if not isinstance(t, Tensor):
            raise InputError(f"noise levels must be a [B] tensor, found {type(t).__name__}; "
                             "wrap them with torch.as_tensor")
        if t.dim() != 1:
            raise InputError(f"noise levels must be a [B] tensor, found shape {tuple(t.shape)}")
        if batch is not None and t.shape[0] != batch:
            raise InputError(f"expected {batch} noise levels (one per sample), found {t.shape[0]}")
        if levels_trusted():
            return t.long()
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise InputError("noise levels must be integers; round them first")
        t = t.long()
        if t.numel() and bool(((t < low) | (t > self.num_levels)).any()):
            why = " (a published network has no input at level 0, the clean image)" if low > 0 else ""
            raise InputError(f"noise levels must lie in [{low}, {self.num_levels}], found "
                             f"[{int(t.min())}, {int(t.max())}]{why}")
        return t

    def abar(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """``abar`` at integer levels ``t: [B]`` (dtype/device of ``like`` if given)."""
        table = self.abar_on(t.device)[t.long()]
        return table.to(like.dtype) if like is not None else table.float()

    def abar_continuous(self, t: Tensor) -> Tensor:
        """Continuous twin ``abar(s)`` at real-valued levels ``t`` (``s = t / T``)."""
        s = t / self.num_levels
        b0, b1 = self.beta_start * self.num_levels, self.beta_end * self.num_levels
        return torch.exp(-0.5 * (b1 - b0) * s**2 - b0 * s)

    def sigma(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio ``sigma = sqrt((1 - abar) / abar)`` (EDM's sigma)."""
        a = self.abar(t).double()
        return torch.sqrt((1 - a) / a).float()

    def level_from_sigma(self, sigma: Tensor) -> Tensor:
        """Nearest integer level whose ``sigma`` matches (inverse of :meth:`sigma`)."""
        table = torch.sqrt((1 - self.abar_table) / self.abar_table).to(sigma.device)
        idx = torch.searchsorted(table, sigma.double().contiguous())
        idx = idx.clamp(1, self.num_levels)
        lower_closer = (sigma.double() - table[idx - 1]).abs() < (table[idx] - sigma.double()).abs()
        return torch.where(lower_closer, idx - 1, idx)


_TRUSTED = [0]  # depth of trusted_levels() blocks (a plain global: torch.compile guards on it)


@contextlib.contextmanager
def trusted_levels() -> Iterator[None]:
    """Inside this block level checks keep to shapes: networks skip the range check of their levels
    (:class:`ssni.denoisers.protocol.EpsAdapter`), and so does :meth:`VPSchedule.check_levels`.

    A purification checks its levels once, at its boundary (:meth:`VPSchedule.check_levels`, one
    host read), and every reverse step and score-norm call inside it runs without reading a
    value back to the host: a per-call check would wait for the device's queue at every step,
    and break a compiled graph. A :class:`ssni.Defense` calls its purifier inside such a block
    (its levels lie in ``1..T`` by construction). Code outside such a block keeps the check."""
    _TRUSTED[0] += 1
    try:
        yield
    finally:
        _TRUSTED[0] -= 1


def levels_trusted() -> bool:
    return _TRUSTED[0] > 0


def with_trusted_levels(fn):
    """``fn`` run inside :func:`trusted_levels` (also when activation checkpointing recomputes it in the
    backward pass, which runs outside the block that made the forward)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with trusted_levels():
            return fn(*args, **kwargs)
    return run


def broadcast_to(values: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``[B]`` tensor to ``[B, 1, 1, ...]`` to broadcast against ``x``."""
    return values.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def forward_jump(
    schedule: VPSchedule, x0: Tensor, t: Tensor, eps: Tensor, t_relaxed: Tensor | None = None
) -> Tensor:
    """Diffuse ``x0`` to per-sample levels in one jump: ``x_t = sqrt(abar) x0 + sqrt(1-abar) eps``.

    Args:
        schedule: the VP schedule.
        x0: ``[B, C, H, W]`` in the model's ``[-1, 1]`` scale.
        t: ``[B]`` integer levels in ``0..T``.
        eps: standard Gaussian noise shaped like ``x0``.
        t_relaxed: optional real-valued ``[B]`` levels carrying a gradient. The
            forward value still uses the integer ``t``; the backward pass uses the
            derivative of the continuous twin ``abar(t_relaxed)`` in place of the
            rounding's (zero almost everywhere). This is a straight-through
            relaxation, not the derivative of the computed function, and the
            only place a level carries a gradient: the reverse chain that follows
            runs on the grid of the integer level, so what a change of level does
            to the reverse steps (how many, at which levels) is invisible to the
            gradient. An attacker sees how a change of level changes the injected
            noise, to first order and through this jump only.
    """
    abar = schedule.abar(t, like=x0)
    if t_relaxed is not None:
        smooth = schedule.abar_continuous(t_relaxed).to(x0.dtype)
        abar = abar + (smooth - smooth.detach())
    abar = broadcast_to(abar, x0)
    return abar.sqrt() * x0 + (1 - abar).clamp_min(0).sqrt() * eps


def to_model_scale(x: Tensor) -> Tensor:
    """Map images from ``[0, 1]`` to the diffusion model's ``[-1, 1]``."""
    return 2 * x - 1


def to_image_scale(x: Tensor) -> Tensor:
    """Map from ``[-1, 1]`` back to ``[0, 1]`` (clipped)."""
    return ((x + 1) / 2).clamp(0, 1)


__all__ = ["VPSchedule", "forward_jump", "broadcast_to", "to_model_scale", "to_image_scale", "trusted_levels"]


@functools.lru_cache(maxsize=32)
def _abar_table(num_levels: int, beta_start: float, beta_end: float, device: torch.device) -> Tensor:
    betas = VPSchedule(num_levels, beta_start, beta_end).betas
    return torch.cumprod(1.0 - betas, dim=0).to(device)
