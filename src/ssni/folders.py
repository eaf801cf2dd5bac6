"""Output folders: each belongs to the command that made it, and is checked before anything is written.

``ssni evaluate`` and ``ssni purify`` both keep a ``config.json`` in their folder, so one run into
the other's folder would overwrite it and leave the folder unusable for both. :func:`claim`
records the command in ``OUT/.ssni-command`` and refuses a folder of another command (folders
written before the marker existed are recognised by their tables), a path that is a file, and a
folder that cannot be written, before anything is written.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from contextlib import closing
from pathlib import Path

from .errors import InputError, ResumeError

OWNER_FILE = ".ssni-command"
TABLES = {"evaluate": ("results.sqlite", "shard-*-of-*.sqlite"), "purify": ("purify.csv",),
          "converge": ("convergence.json",)}  # what each command's folder holds


def owner(out: Path) -> str | None:
    """The command whose results ``out`` holds (``None``: none, or not a folder)."""
    out = Path(out)
    if not out.is_dir():
        return None
    marker = out / OWNER_FILE
    if marker.is_file():
        return marker.read_text().strip() or None
    return next((command for command, patterns in TABLES.items()
                 if any(any(out.glob(pattern)) for pattern in patterns)), None)


def claim(out: Path, command: str) -> Path:
    """Create ``out`` if needed and mark it as ``command``'s; raise :class:`InputError` for a file,
    a folder of another command, or a folder that cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (it is created if missing)")
    found = owner(out)
    if found not in (None, command):
        raise InputError(f"{out} holds the results of `ssni {found}`; `ssni {command}` would overwrite its "
                         "config.json: give a new --out folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / OWNER_FILE).write_text(command + "\n")
    except OSError as err:
        raise InputError(f"cannot write into {out}: {err.strerror or err}; give an --out folder you can "
                         "write to") from err
    return out


def check_output_file(path: Path) -> None:
    """Refuse an output file path that is a folder or whose folder cannot be made or written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name, e.g. {path / 'results.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from err


def read_json(path: Path) -> dict:
    """A JSON file the run wrote itself; a damaged one is a :class:`ResumeError`."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ResumeError(f"{path} is damaged (not valid JSON: {err}); restore it, or rerun into a new "
                          "--out folder") from err
    if not isinstance(data, dict):
        raise ResumeError(f"{path} is damaged (a JSON {type(data).__name__}, expected an object)")
    return data


def stored(out: Path, command: str, total: int | None = None) -> str:
    """What ``out`` holds now (of ``total``), for the message of an interrupted run."""
    out, of = Path(out), f" of {total}" if total else ""
    try:
        if command == "evaluate" and (out / "results.sqlite").is_file():
            with closing(sqlite3.connect(out / "results.sqlite")) as db:
                count = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
            return f"{count}{of} sample(s) are stored in {out / 'results.sqlite'}"
        if command == "purify" and (out / "purify.csv").is_file():
            with open(out / "purify.csv", newline="") as handle:
                count = sum(1 for _ in csv.DictReader(handle))
            return f"{count}{of} image(s) are purified and listed in {out / 'purify.csv'}"
    except (OSError, sqlite3.Error):
        pass
    return f"what finished is kept in {out}"


__all__ = ["OWNER_FILE", "check_output_file", "claim", "owner", "read_json", "stored"]
