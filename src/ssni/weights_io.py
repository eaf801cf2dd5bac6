"""Safe readers and strict matching of state dicts.

safetensors files load as they are; ``.pt``/``.pth`` files load with
``torch.load(weights_only=True)``, which refuses code objects. Unpickling
arbitrary code happens only with ``allow_pickle=True``, which the CLI exposes as
an explicit opt-in flag. Key and shape mismatches are listed, never ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(path: Path, module: nn.Module, metadata: dict | None = None) -> str:
    """Write ``module``'s state dict as safetensors (metadata as JSON strings); return its sha256."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600; a weight file is as readable as any other
    return file_sha256(path)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def load_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a torch file, safely unless ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} not found; check the path or --weights-dir")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}); "
                                  "it may be truncated: download it again") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds pickled code, which is not loaded by default; if you "
                              "trust its source, pass --allow-pickle (or allow_pickle=True), or "
                              "convert it once with `ssni convert`") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({err}); "
                              "it may be truncated or of another format") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


def match_state_dict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module`` strictly, listing every missing/unexpected/mismatched key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
                        for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", mismatched)) if items]
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
