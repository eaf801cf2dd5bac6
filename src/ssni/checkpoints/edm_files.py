"""EDM networks from files: a safetensors file ``ssni convert`` wrote, or the original ``.pkl``.

The network modules live in :mod:`ssni.denoisers.edm` and know nothing of files; reading the
published pickle is :mod:`ssni.checkpoints.edm_pickle`'s (no code inside it is run).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..denoisers.edm import EDMConfig, EDMDenoiser
from ..errors import CheckpointError
from ..weights_io import load_state_dict, match_state_dict
from .edm_pickle import read_edm_network


def load_edm(path: str | Path, allow_pickle: bool = False) -> EDMDenoiser:
    """Load an EDM denoiser from a file ``ssni convert`` wrote, or from the original ``.pkl``.

    The original pickle is read only with ``allow_pickle=True``; even then no code inside
    it runs (see :func:`ssni.checkpoints.edm_pickle.read_edm_pickle`).
    """
    path = Path(path)
    if path.suffix == ".pkl":
        state, cfg = read_edm_network(path, allow_pickle)
    else:
        state, cfg = load_state_dict(path), read_edm_config(path)
    if cfg.unet.label_dim:
        raise CheckpointError(f"{path} is a class-conditional EDM network ({cfg.unet.label_dim} labels); "
                              "purification needs an unconditional one, e.g. edm-cifar10-32x32-uncond-vp.pkl")
    denoiser = EDMDenoiser(cfg)
    match_state_dict(denoiser, state, str(path))
    return denoiser.eval()


def read_edm_config(path: Path) -> EDMConfig:
    """The :class:`EDMConfig` stored in a converted file's safetensors metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "edm_config" not in meta:
        raise CheckpointError(f"{path} has no 'edm_config' metadata; EDM weights must be written by "
                              "`ssni convert` (or ssni.checkpoints.edm_pickle.convert_edm_pickle)")
    return EDMConfig.from_dict(json.loads(meta["edm_config"]))


__all__ = ["load_edm", "read_edm_config"]
