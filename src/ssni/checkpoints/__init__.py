"""Safe, strict weight loading and the named-model registry."""

from ..weights_io import file_sha256, load_state_dict, match_state_dict, save_weights
from .registry import build_model, load_manifest, load_named

__all__ = ["build_model", "file_sha256", "load_manifest", "load_named", "load_state_dict",
           "match_state_dict", "save_weights"]
