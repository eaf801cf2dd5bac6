"""ssni: Sample-specific Score-aware Noise Injection for diffusion-based purification.

Public API::

    from ssni import Defense, SSNI, DiffPure, GDMP, GNS, VPSchedule
    from ssni import Calibration, make_reweight, score_norm, load_named

The names are imported on first use (PEP 562), so ``import ssni.errors`` or ``ssni --help``
does not load torch.
"""

import sys
from importlib import import_module
from types import ModuleType

from .errors import CheckpointError, ConfigError, InputError, ResumeError, SSNIError

__version__ = "0.1.0"

_LAZY = {
    "load_named": "checkpoints.registry", "SSNI": "defense", "Defense": "defense", "VPSchedule": "diffusion",
    "GDMP": "purifiers", "GNS": "purifiers", "DiffPure": "purifiers", "Calibration": "reweight",
    "CallableReweight": "reweight", "LinearReweight": "reweight", "SigmoidReweight": "reweight",
    "make_reweight": "reweight", "SampleNoise": "rng",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ssni' has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, "score_norm"])


class _Package(ModuleType):
    """``ssni.score_norm`` is the function, though a submodule has the same name."""

    @property
    def score_norm(self):
        from .score_norm import score_norm

        return score_norm

    @score_norm.setter
    def score_norm(self, _module) -> None:
        pass  # the import system records the submodule here on its first import; keep the function


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Calibration", "CallableReweight", "CheckpointError", "ConfigError", "Defense", "DiffPure", "GDMP", "GNS", "InputError",
    "LinearReweight", "ResumeError", "SSNI", "SSNIError", "SampleNoise", "SigmoidReweight", "VPSchedule",
    "load_named", "make_reweight", "score_norm",
]
