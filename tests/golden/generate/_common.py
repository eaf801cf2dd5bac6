"""Shared plumbing of the golden-fixture generators (see ``README.md`` beside this file).

The generators run the *reference* projects' own code. Nothing of those projects is in this
repository: each generator imports it at run time from ``$SSNI_REFERENCES/<checkout>`` and exits
cleanly (status 0, one line saying why) when the variable or the checkout is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parents[1]
ENV = "SSNI_REFERENCES"  # folder holding the reference checkouts, one sub-folder per repository
PACKAGES_ENV = "SSNI_REFERENCE_PACKAGES"  # optional folder of extra packages a reference needs (torchsde, ...)
RTOL = 1e-5  # what the golden tests require of our code; the reference must reproduce its own file better


def reference(checkout: str) -> Path | None:
    """``$SSNI_REFERENCES/<checkout>`` on ``sys.path`` (and the extra packages), or ``None`` when absent."""
    root = os.environ.get(ENV)
    if not root or not (Path(root) / checkout).is_dir():
        return None
    packages()
    sys.path.insert(0, str(Path(root) / checkout))
    commit = checkout_commit(Path(root) / checkout)
    print(f"  reference {Path(root) / checkout} at {commit or 'an unknown commit (not a git work tree)'}"
          " (the fixture's .source.json names the commit it was made from)")
    return Path(root) / checkout


def packages() -> None:
    """``$SSNI_REFERENCE_PACKAGES`` (extra PyPI packages a reference needs) on ``sys.path``."""
    extra = os.environ.get(PACKAGES_ENV)
    if extra and extra not in sys.path:
        sys.path.insert(0, extra)


def checkout_commit(path: Path) -> str | None:
    """The checkout's commit when it is a git work tree (an archive export has none)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source(fixture: Path) -> dict:
    """The fixture's sidecar ``<name>.source.json``: reference repository, commit, files, what was run."""
    return json.loads(fixture.with_name(fixture.name.split(".")[0] + ".source.json").read_text())


def stand_in(name: str, **attrs) -> types.ModuleType:
    """An empty module for an import the reference names but the path we run does not use."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch's import scans need a spec
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def randn_like_from(draws):
    """``torch.randn_like`` serves ``draws`` (an iterator of tensors) in call order; a callable
    ``draws(like)`` makes each draw instead (write mode records them)."""
    original = torch.randn_like

    def served(like, *args, **kwargs):
        value = draws(like) if callable(draws) else next(draws)
        assert value.shape == like.shape, (value.shape, like.shape)
        return value.to(like)

    torch.randn_like = served
    try:
        yield
    finally:
        torch.randn_like = original


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def compare(name: str, produced: dict, stored: dict, rtol: float = RTOL) -> bool:
    """Print and return whether every ``produced`` tensor matches the stored one."""
    ok = True
    for key, value in produced.items():
        err = rel_err(value, stored[key])
        ok &= err < rtol
        print(f"  {name} {key}: relative error {err:.2e} ({'ok' if err < rtol else 'MISMATCH'})")
    return ok


def main(generators: dict, doc: str) -> None:
    """``python <script> [NAME ...] [--write DIR]``: check the committed fixtures (default) or write new
    ones into ``DIR``. Exits 0 when every reference that was found reproduced its fixture."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("names", nargs="*", choices=[[], *generators], help="fixtures (default: all)")
    parser.add_argument("--write", type=Path, help="write fresh fixtures into this folder instead of checking")
    args = parser.parse_args()
    if not os.environ.get(ENV):
        print(f"skipped: set {ENV} to the folder of reference checkouts (tests/golden/generate/README.md)")
        return
    names = args.names or list(generators)
    if len(names) > 1:  # one process per fixture: the references' top-level modules share names (utils, ...)
        extra = ["--write", str(args.write)] if args.write else []
        failed = [n for n in names if subprocess.run([sys.executable, sys.argv[0], n, *extra]).returncode]
        if failed:
            sys.exit(f"not reproduced: {', '.join(failed)}")
        return
    failed = []
    for name in names:
        run = generators[name]
        print(f"{name}:")
        result = run(args.write)
        if result is None:
            print(f"  skipped: {run.__doc__.splitlines()[0]} (checkout or package not found)")
        elif not result:
            failed.append(name)
    if failed:
        sys.exit(f"not reproduced: {', '.join(failed)}")
