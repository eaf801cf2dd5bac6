"""Diffusion purifiers with per-sample levels: ``purify(x, t, noise) -> x``.

Each module holds a purifier and its settings dataclass (its ``[purifier.<name>]`` config table).
"""

from .base import Purifier
from .diffpure import DiffPure, DiffPureSettings
from .gdmp import GDMP, GDMPSettings
from .gns import GNS, GNSSettings

__all__ = ["DiffPure", "DiffPureSettings", "GDMP", "GDMPSettings", "GNS", "GNSSettings", "Purifier"]
