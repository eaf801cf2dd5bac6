"""One model registry over both sources of named models.

A name is either **shipped**: trained by ``ssni train``, listed in the weights folder's
``manifest.json`` (:mod:`ssni.checkpoints.registry`), or **public**: a published checkpoint
described in :data:`ssni.checkpoints.public.PUBLIC`. :func:`find_model` says which (the manifest
wins, so a folder can shadow a public name with its own model) and :func:`load_model` loads it;
no caller branches on model names or sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import CheckpointError
from .public import PUBLIC, load_public
from .registry import KINDS, MANIFEST, default_weights_dir, load_manifest, load_named

SOURCES = ("shipped", "public")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # one of SOURCES
    kind: str  # "diffusion" or "classifier"
    file: str


def all_models(weights_dir: Path | None = None) -> list[ModelEntry]:
    """Every model a config can name: the folder's manifest first, then the public checkpoints."""
    manifest = load_manifest(weights_dir)
    shipped = [ModelEntry(n, "shipped", KINDS[e["arch"]], e["file"]) for n, e in sorted(manifest.items())]
    public = [ModelEntry(n, "public", e.kind, e.file) for n, e in PUBLIC.items() if n not in manifest]
    return shipped + public


def find_model(name: str, weights_dir: Path | None = None) -> ModelEntry | None:
    return next((entry for entry in all_models(weights_dir) if entry.name == name), None)


def load_model(name: str, weights_dir: Path | None = None, *, random_init: bool = False,
               allow_pickle: bool = False) -> nn.Module:
    """Load the model ``name`` from whichever source holds it, in eval mode. ``random_init`` builds a
    public architecture with random weights (dry runs); shipped models always load their weights."""
    weights_dir = Path(weights_dir or default_weights_dir())
    entry = find_model(name, weights_dir)
    if entry is None:
        raise CheckpointError(f"no model named {name!r}: not in {weights_dir / MANIFEST} and not a public "
                              "checkpoint (`ssni models` lists them)")
    if entry.source == "shipped":
        return load_named(name, weights_dir)
    return PUBLIC[name].build().eval() if random_init else load_public(name, weights_dir, allow_pickle)
