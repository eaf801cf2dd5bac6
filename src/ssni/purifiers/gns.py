"""GNS, gradual noise scheduling (Lee & Kim, ICCV 2023).

Several DiffPure rounds, each with its own level (CIFAR-10:
``30, 30, 30, 30, 50, 50, 125, 125``) and full denoising; at classification time
a majority vote over several purifications (``Defense(votes=10)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Purifier, check_positive_levels


@dataclass(frozen=True)
class GNSSettings:
    """GNS's own config table ``[purifier.gns]``: the level of every round (each in [1, 1000])."""

    levels: tuple[int, ...] = field(default=(30, 30, 30, 30, 50, 50, 125, 125), metadata={"range": (1, 1000)})


@dataclass
class GNS(Purifier):
    levels: tuple[int, ...] = (30, 30, 30, 30, 50, 50, 125, 125)
    steps: int | None = None

    def __post_init__(self):
        self.check_solver()
        self.levels = tuple(self.levels)
        check_positive_levels("GNS", self.levels, self.schedule)

    @property
    def t_stars(self) -> tuple[int, ...]:
        return self.levels
