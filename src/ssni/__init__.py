"""ssni: Sample-specific Score-aware Noise Injection for diffusion-based purification.

Public API::

    from ssni import Defense, SSNI, DiffPure, GDMP, GNS, VPSchedule
    from ssni import Calibration, make_reweight, score_norm, load_named
"""

from .checkpoints.registry import load_named
from .defense import SSNI, Defense
from .diffusion import VPSchedule
from .errors import CheckpointError, ConfigError, InputError, ResumeError, SSNIError
from .purifiers import GDMP, GNS, DiffPure
from .reweight import Calibration, CallableReweight, LinearReweight, SigmoidReweight, make_reweight
from .rng import SampleNoise
from .score_norm import score_norm

__version__ = "0.1.0"

__all__ = [
    "Calibration", "CallableReweight", "CheckpointError", "ConfigError", "Defense", "DiffPure", "GDMP", "GNS", "InputError",
    "LinearReweight", "ResumeError", "SSNI", "SSNIError", "SampleNoise", "SigmoidReweight", "VPSchedule",
    "load_named", "make_reweight", "score_norm",
]
