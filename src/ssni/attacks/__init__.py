"""Attacks share one call shape: ``attack(model, x, y) -> x_adv``."""

from .base import ThreatModel
from .pgd import PGD

__all__ = ["PGD", "ThreatModel"]
