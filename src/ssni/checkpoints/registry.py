"""Named models as data: ``weights/manifest.json`` maps a name to its file and provenance.

Each entry holds the architecture (a key of :data:`ARCHITECTURES`), its config,
the file name, sha256 and size, and how it was made (command, seed, data split,
training time, metrics). One generic loader builds the architecture, checks the
hash and loads strictly; there is no per-model code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..classifiers.small_cnn import SmallCNN, SmallCNNConfig
from ..denoisers.unet import UNet, UNetConfig
from ..errors import CheckpointError
from ..weights_io import file_sha256, load_state_dict, match_state_dict

ARCHITECTURES = {
    "unet": (UNet, UNetConfig),
    "small_cnn": (SmallCNN, SmallCNNConfig),
}
KINDS = {"unet": "diffusion", "small_cnn": "classifier"}  # what each architecture is used as
MANIFEST = "manifest.json"


def default_weights_dir() -> Path:
    """``$SSNI_WEIGHTS_DIR`` if set, else the repository's ``weights/`` folder."""
    env = os.environ.get("SSNI_WEIGHTS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "weights"


def load_manifest(weights_dir: Path | None = None) -> dict[str, dict]:
    path = Path(weights_dir or default_weights_dir()) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); restore it from git") from err


def build_model(arch: str, config: dict) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[arch]
    return model_cls(config_cls.from_dict(config))


def load_named(name: str, weights_dir: Path | None = None) -> nn.Module:
    """Build and load the model ``name`` of the manifest, sha256-checked, in eval mode, with the side of
    the images it was trained at as ``model.image_size`` (``None`` when the manifest does not say)."""
    weights_dir = Path(weights_dir or default_weights_dir())
    manifest = load_manifest(weights_dir)
    if name not in manifest:
        raise CheckpointError(f"no model named {name!r} in {weights_dir / MANIFEST}; "
                              f"known: {sorted(manifest) or 'none'}")
    entry = manifest[name]
    path = weights_dir / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"weight file {path} for {name!r} not found")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path} is corrupt or was changed: sha256 {digest[:12]}..., the "
                              f"manifest expects {entry['sha256'][:12]}...; restore it (git checkout) "
                              "or retrain with the command in the manifest")
    model = build_model(entry["arch"], entry["config"])
    match_state_dict(model, load_state_dict(path), str(path))
    model.image_size = trained_size(entry)  # a Defense checks its inputs against the classifier's
    return model.eval()


def trained_size(entry: dict) -> int | None:
    """The image side a manifest entry's model was trained at (its dataset's format), if known."""
    from ..data import IMAGE_FORMATS

    return IMAGE_FORMATS.get(entry.get("data", {}).get("dataset"), (None, None))[1]


def register(weights_dir: Path, name: str, entry: dict) -> None:
    """Add or replace ``name`` in the manifest (used by ``ssni train``)."""
    manifest = load_manifest(weights_dir)
    manifest[name] = entry
    path = Path(weights_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
