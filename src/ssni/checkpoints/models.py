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


def format_models(weights_dir: Path | None = None) -> str:
    """``ssni models``: the shipped models, those of ``weights_dir`` when it is another folder, and
    the public checkpoints (file, size, metrics or source, license)."""
    shipped_dir = default_weights_dir()
    lines = [f"shipped (trained by ssni, in {shipped_dir}; the default --weights-dir):"]
    lines += _manifest_lines(shipped_dir)
    folders = [shipped_dir]
    if weights_dir is not None and Path(weights_dir).resolve() != shipped_dir.resolve():
        lines += [f"in {weights_dir} (with --weights-dir {weights_dir}, these replace the shipped list):"]
        lines += _manifest_lines(Path(weights_dir)) or ["  (no manifest.json models)"]
        folders = [Path(weights_dir)]
    names = set(load_manifest(folders[0]))
    lines.append("public (download into --weights-dir: `ssni fetch NAME` or by hand from the URL):")
    for name, info in PUBLIC.items():
        if name not in names:  # a manifest entry of that name shadows the public checkpoint
            lines += [f"  {name:<28} {info.kind:<10} {info.file}", f"  {'':<28} {info.size}; {info.url}  "
                      f"[{info.license}]"]
    return "\n".join(lines)


def _manifest_lines(folder: Path) -> list[str]:
    lines = []
    for name, info in sorted(load_manifest(folder).items()):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(info.get("metrics", {}).items()))
        size = f"{info['size_bytes'] / 1e6:.2f} MB" if "size_bytes" in info else "size not recorded"
        lines += [f"  {name:<28} {KINDS[info['arch']]:<10} {info['file']}",
                  f"  {'':<28} {size}, {metrics or 'no metrics'}; reproduce: {info.get('command', 'not recorded')}"]
    return lines
