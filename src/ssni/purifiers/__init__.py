"""Diffusion purifiers with per-sample levels: ``purify(x, t, noise) -> x``."""

from .base import Purifier
from .diffpure import DiffPure
from .gdmp import GDMP
from .gns import GNS

__all__ = ["DiffPure", "GDMP", "GNS", "Purifier"]
