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
          "converge": ("convergence.json",), "demo": ("results.json", "table.txt", "runs/*/results.sqlite"),
          "sweep": ("sweep.json", "times.json")}  # what each command's folder holds
# The evaluations inside a demo, sweep or converge folder (runs/<method>/, <stem>/<point>/, <axis>/<rung>/) are
# evaluate folders of their own: `ssni report` reads them, `ssni evaluate` resumes them.


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
    _not_a_file(out, "--out")
    found = owner(out)
    if found not in (None, command):
        raise InputError(f"{out} holds the results of `ssni {found}`; `ssni {command}` would mix its own files "
                         "into them: give a new --out folder")
    return _write_into(out, "--out", OWNER_FILE, command + "\n")


def check_folder(path: Path, option: str | None = None) -> Path:
    """Create the folder ``path`` if needed and check that it can be written (a probe file, removed
    again); raise :class:`InputError` for a file or a folder that cannot be written (with the
    command-line ``option`` that names the folder, when given)."""
    path = Path(path)
    _not_a_file(path, option)
    _write_into(path, option, ".ssni-probe", "")
    (path / ".ssni-probe").unlink()
    return path


def _not_a_file(path: Path, option: str | None) -> None:
    if path.exists() and not path.is_dir():
        raise InputError(f"{option + ' ' if option else ''}{path} is a file; give a folder (it is created if "
                         "missing)")


def _write_into(folder: Path, option: str | None, name: str, text: str) -> Path:
    """Create ``folder`` and write ``folder/name``; an :class:`OSError` becomes one :class:`InputError`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    except OSError as err:
        hint = f"; give {option} a folder you can write to" if option else ""
        raise InputError(f"cannot write into {folder}: {err.strerror or err}{hint}") from err
    return folder


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
        if command == "demo":
            return f"the finished evaluations are kept under {out / 'runs'}"
        if command == "sweep" and (out / "sweep.json").is_file():
            points = read_json(out / "sweep.json")["points"]
            done = sum(1 for p in points if p.get("complete"))
            return f"{done} of {len(points)} point(s) are complete under {out} (listed in {out / 'sweep.json'})"
    except (OSError, sqlite3.Error, ResumeError, KeyError, TypeError):
        pass
    return f"what finished is kept in {out}"


__all__ = ["OWNER_FILE", "check_folder", "check_output_file", "claim", "owner", "read_json", "stored"]
