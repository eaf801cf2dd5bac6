"""Threat models: an l_p ball of radius ``eps`` around ``x``, intersected with the box [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True)
class ThreatModel:
    """``norm`` is ``"linf"`` or ``"l2"``; ``eps`` the radius in [0, 1] pixel units."""

    norm: Literal["linf", "l2"] = "linf"
    eps: float = 0.3

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"unknown norm {self.norm!r}; choose one of ['l2', 'linf']")
        if not self.eps >= 0:
            raise ConfigError(f"eps must be >= 0, found {self.eps}")

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Nearest point (per sample) of the ball around ``x``, then clipped to [0, 1]."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (self.eps / norms).clamp(max=1).reshape(-1, *[1] * (x.dim() - 1))
        return (x + delta).clamp(0, 1)

    def ascent_direction(self, grad: Tensor) -> Tensor:
        """Steepest ascent of unit size: the sign for l_inf, the normalised gradient for l_2."""
        if self.norm == "linf":
            return grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return grad / norms.reshape(-1, *[1] * (grad.dim() - 1))

    def random_point(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """A uniform start inside the l_inf ball, or a random direction scaled inside the l_2 ball."""
        noise = torch.rand(x.shape, generator=gen).to(x) * 2 - 1
        if self.norm == "linf":
            return self.project(x + self.eps * noise, x)
        radius = torch.rand(x.shape[0], generator=gen).to(x).reshape(-1, *[1] * (x.dim() - 1))
        return self.project(x + self.eps * radius * self.ascent_direction(noise), x)
