"""``ssni report DIR``: summary.json, a table and figures from a finished (or partial) store."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ResumeError
from ..report import level_histogram
from .config import from_dict
from .store import RESULTS_FILE, Store
from .summary import format_summary, summarize, write_summary


def report(out: Path) -> str:
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        raise ResumeError(f"{path} not found; run `ssni evaluate --out {out}` first")
    saved = json.loads((Path(out) / "config.json").read_text())
    saved.pop("hash", None)
    cfg = from_dict(saved)
    store = Store(path, cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    rows = store.rows()
    store.close()
    summary = summarize(rows, cfg)
    write_summary(summary, Path(out))
    levels = [r["t_star"][-1] for r in rows if r["t_star"]]
    if levels:
        level_histogram({"t*": torch.tensor(levels)}, Path(out) / "t_star.png")
    return format_summary(summary)
