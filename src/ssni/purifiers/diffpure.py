"""DiffPure (Nie et al., ICML 2022): one forward jump to ``t*``, one reverse chain."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Purifier, check_positive_levels


@dataclass(frozen=True)
class DiffPureSettings:
    """DiffPure's own config table ``[purifier.diffpure]``: the constant level ``t*`` it jumps to.

    Field metadata ``range`` holds the inclusive bounds the config checks enforce.
    """

    t_star: int = field(default=150, metadata={"range": (1, 1000)})


@dataclass
class DiffPure(Purifier):
    """DiffPure with the generalised DDPM (``eta=1``) / DDIM (``eta=0``) reverse step.

    Defaults follow the SSNI code on CIFAR-10 l_inf: ``t* = 100`` and 100 reverse steps.
    ``steps=None`` runs full unit-step DDPM (``n = t_i``).
    """

    t_star: int = 100
    steps: int | None = 100

    def __post_init__(self):
        self.check_solver()
        check_positive_levels("DiffPure", (self.t_star,), self.schedule)

    @property
    def t_stars(self) -> tuple[int, ...]:
        return (self.t_star,)
