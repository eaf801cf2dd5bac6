"""Per-sample results in SQLite, committed as they are produced.

One row per sample: label, clean prediction, score norm, levels, seeds, timing,
and for each attack the adversarial prediction (after fresh-randomness
re-scoring) and whether the sample is still robust. A store remembers the
config hash it was made with and refuses to mix runs of different configs (a store without rows, left by a run
that failed before its first batch, is taken over). :func:`exclusive` keeps two
processes from writing one store at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ResumeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    sample_id INTEGER PRIMARY KEY,
    label INTEGER NOT NULL,
    clean_pred INTEGER NOT NULL,
    clean_correct INTEGER NOT NULL,
    score_norm REAL,
    t_star TEXT NOT NULL,
    attacks TEXT NOT NULL,
    robust INTEGER NOT NULL,
    seconds REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS adversarial (
    sample_id INTEGER NOT NULL,
    attack TEXT NOT NULL,
    image BLOB NOT NULL,
    PRIMARY KEY (sample_id, attack)
);
"""
RESULTS_FILE = "results.sqlite"
COLUMNS = ("sample_id", "label", "clean_pred", "clean_correct", "score_norm", "t_star", "attacks", "robust",
           "seconds")


class Store:
    """An SQLite file of per-sample rows for one config (by hash)."""

    def __init__(self, path: Path, config_hash: str | None, config_json: str | None):
        """Open (or create) the store for the config with ``config_hash``; ``None``: open it to read,
        whatever config made it."""
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(SCHEMA)
            found = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
            empty = self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0
        except sqlite3.DatabaseError as err:
            raise ResumeError(f"{self.path} is not a results store ({err}); use a new --out folder") from err
        if config_hash is None:  # read what the store holds, whatever config made it
            return
        if found and found.get("config_hash") != config_hash and not empty:
            raise ResumeError(f"{self.path} holds results of another config (hash {found.get('config_hash')}, "
                              f"this one {config_hash}); use a new --out folder or the original config. A folder "
                              "made by an older ssni can differ by the hash alone (a release that adds or moves "
                              "config keys changes it): `ssni report` still reads it; rerun into a new folder")
        if found.get("config_hash") != config_hash:  # new, or an empty store of a failed run: take it over
            with self.db:
                self.db.execute("DELETE FROM meta")
                self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                                    [("config_hash", config_hash), ("config", config_json)])

    def done_ids(self) -> set[int]:
        return {row[0] for row in self.db.execute("SELECT sample_id FROM samples")}

    def add(self, rows: list[dict], adversarial: dict[tuple[int, str], Tensor] | None = None) -> None:
        """Insert finished samples and their adversarial images in one transaction.

        Either a whole batch survives a crash or none of it does.
        """
        values = [tuple(json.dumps(r[c]) if c in ("t_star", "attacks") else r[c] for c in COLUMNS) for r in rows]
        images = [(sid, attack, _to_blob(img)) for (sid, attack), img in (adversarial or {}).items()]
        with self.db:
            self.db.executemany(f"INSERT INTO samples VALUES ({', '.join('?' * len(COLUMNS))})", values)
            self.db.executemany("INSERT INTO adversarial VALUES (?, ?, ?)", images)

    def adversarial(self, attack: str) -> dict[int, Tensor]:
        """Stored adversarial images of one attack (key ``"k:name"``), by sample id."""
        query = "SELECT sample_id, image FROM adversarial WHERE attack = ? ORDER BY sample_id"
        return {sid: _from_blob(blob) for sid, blob in self.db.execute(query, (attack,))}

    def rows(self) -> list[dict]:
        out = []
        for values in self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM samples ORDER BY sample_id"):
            row = dict(zip(COLUMNS, values))
            row["t_star"], row["attacks"] = json.loads(row["t_star"]), json.loads(row["attacks"])
            out.append(row)
        return out

    def config(self) -> dict:
        return json.loads(self.db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])

    def merge_from(self, other: Store) -> None:
        """Copy the rows of a shard store into this one (same config required)."""
        if other.config() != self.config():
            raise ResumeError(f"cannot merge {other.path}: it was made with another config")
        done = self.done_ids()
        missing = [r for r in other.rows() if r["sample_id"] not in done]
        keys = {f"{k}:{a['name']}" for k, a in enumerate(self.config()["attacks"])}
        images = {(sid, key): img for key in keys for sid, img in other.adversarial(key).items() if sid not in done}
        if missing:
            self.add(missing, images)

    def close(self) -> None:
        self.db.close()


def stored_rows(path: Path, cfg=None) -> list[dict]:
    """The rows of the store at ``path``: of the experiment ``cfg`` (another config's store is a
    :class:`ResumeError`), or with ``cfg=None`` whatever the store holds."""
    store = (Store(path, None, None) if cfg is None
             else Store(path, cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True)))
    try:
        return store.rows()
    finally:
        store.close()


@contextmanager
def exclusive(path: Path):
    """Hold ``<path>.lock`` for the duration (``flock``, released when the process dies), or refuse
    with the process that holds it."""
    lock_path = Path(str(path) + ".lock")
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ResumeError(f"{path} is being written by {holder}; wait for it to finish or use another --out")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _to_blob(image: Tensor) -> bytes:
    """``[C, H, W]`` float image -> bytes (shape header, then float32 data)."""
    image = image.detach().float().cpu().contiguous()
    header = json.dumps(list(image.shape)).encode().ljust(32)
    return header + image.numpy().tobytes()


def _from_blob(blob: bytes) -> Tensor:
    shape = json.loads(blob[:32].decode())
    return torch.frombuffer(bytearray(blob[32:]), dtype=torch.float32).reshape(shape)
