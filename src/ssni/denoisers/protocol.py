"""The one model protocol every diffusion network is adapted to.

An :class:`EpsModel` is any callable ``model(x_t, t) -> eps_hat`` where
``x_t: [B, C, H, W]`` lives in the ``[-1, 1]`` image scale of a VP diffusion and
``t: [B]`` holds integer levels in ``1..T`` of the DDPM schedule. Format quirks
(EDM's sigma conditioning, learned-variance channels, label scaling) live in
adapters; purifiers and score norms only ever see this protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from ..diffusion import VPSchedule, broadcast_to, levels_trusted
from ..errors import InputError


class EpsModel(Protocol):
    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor: ...


def eps_to_x0(schedule: VPSchedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    abar = broadcast_to(schedule.abar(t, like=x_t), x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_to_score(schedule: VPSchedule, t: Tensor, eps: Tensor) -> Tensor:
    """``score(x_t, t) = -eps / sqrt(1 - abar_t)`` (Song et al., 2021)."""
    abar = broadcast_to(schedule.abar(t, like=eps), eps)
    return -eps / (1 - abar).sqrt()


class EpsAdapter(nn.Module):
    """Base of every adapter from a published network to the protocol.

    ``forward(x_t, t)`` checks the levels (a ``[B]`` integer tensor in ``1..T``: a network has no
    input at level 0, the clean image) and calls :meth:`eps`, where a subclass keeps only its
    format's quirk (label scaling, output channels, ``.sample``, sigma). Inside a purification or
    a score-norm pass, which check their levels once at their boundary
    (:func:`ssni.diffusion.trusted_levels`), only the shape is checked: no host read per call.
    """

    schedule: VPSchedule = VPSchedule()

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if levels_trusted():
            if t.shape != (x_t.shape[0],):
                raise InputError(f"expected {x_t.shape[0]} noise levels (one per sample), found shape {tuple(t.shape)}")
            return self.eps(x_t, t.long())
        return self.eps(x_t, self.schedule.check_levels(t, batch=x_t.shape[0], low=1))

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError


class EDMAdapter(EpsAdapter):
    """Wrap an EDM-convention denoiser ``D(x, sigma) -> x0_hat`` as an :class:`EpsModel`.

    A VP state ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` is, after dividing by
    ``sqrt(abar)``, the EDM state ``x0 + sigma eps`` with
    ``sigma = sqrt((1 - abar) / abar)`` (Karras et al., 2022, eq. 4-5). So
    ``eps_hat = (x_t / sqrt(abar) - D(x_t / sqrt(abar), sigma)) / sigma``.
    """

    def __init__(self, denoiser: nn.Module, schedule: VPSchedule = VPSchedule()):
        super().__init__()
        self.denoiser, self.schedule = denoiser, schedule

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        abar = self.schedule.abar(t, like=x_t)
        sigma = torch.sqrt((1 - abar) / abar)
        x_edm = x_t / broadcast_to(abar.sqrt(), x_t)
        x0_hat = self.denoiser(x_edm, sigma)
        return (x_edm - x0_hat) / broadcast_to(sigma, x_t)


class CountingModel(nn.Module):
    """Wrap a model and count its calls and network evaluations (batch rows)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0
        self.evaluations = 0

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        self.evaluations += x_t.shape[0]
        return self.model(x_t, t)

    def reset(self) -> None:
        self.calls = self.evaluations = 0
