"""Attacks share one call shape: ``attack(model, x, y) -> x_adv``."""

from .apgd import APGD
from .base import ThreatModel
from .pgd import PGD

__all__ = ["APGD", "PGD", "ThreatModel"]
