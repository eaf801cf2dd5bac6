"""Threat models: an l_p ball of radius ``eps`` around ``x``, intersected with the box [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..rng import SampleNoise


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

    def random_point(self, x: Tensor, noise: SampleNoise) -> Tensor:
        """A uniform start inside the l_inf ball, or a random direction scaled inside the l_2 ball.

        Row ``i`` comes from its own stream ``noise`` (keyed by sample id), so a start does not
        depend on the batch; uniforms are ``Phi(z)`` of keyed normals ``z``.
        """
        uniform = torch.special.ndtr(noise.randn(("start",), x))
        if self.norm == "linf":
            return self.project(x + self.eps * (2 * uniform - 1), x)
        direction = self.ascent_direction(noise.randn(("start-direction",), x))
        radius = torch.special.ndtr(noise.randn(("start-radius",), x[:, :1, :1, :1]))
        return self.project(x + self.eps * radius * direction, x)
