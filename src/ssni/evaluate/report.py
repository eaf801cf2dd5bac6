"""``ssni report DIR``: summary.json, a table and figures from a finished (or partial) store."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ResumeError
from ..folders import read_json
from ..report import level_histogram, robust_vs_draws_plot
from .config import ExperimentConfig, from_dict
from .store import RESULTS_FILE, stored_rows
from .summary import format_summary, summarize, write_summary


def summarize_run(out: Path, cfg: ExperimentConfig, weights_dir: Path | None = None, sanity_n: int = 0,
                  own_config: bool = False) -> str:
    """Write ``out/summary.json`` (with sanity checks on ``sanity_n`` samples if > 0), a ``t*`` plot
    and robust accuracy against the number of fresh draws. ``own_config``: ``cfg`` is the one the
    folder recorded, so its store is read whatever hash an older ssni gave it."""
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        raise ResumeError(f"{path} not found; run `ssni evaluate --out {out}` first")
    rows = stored_rows(path, None if own_config else cfg)
    summary = summarize(rows, cfg)
    if sanity_n:
        from .runner import run_sanity

        summary["sanity"] = run_sanity(speed_of_run(Path(out), cfg), weights_dir, sanity_n)
    write_summary(summary, Path(out))
    if rows:
        robust_vs_draws_plot({"robust": summary["robust_vs_draws"]}, Path(out) / "robust_vs_draws.png")
    levels = [r["t_star"][-1] for r in rows if r["t_star"]]
    if levels:
        level_histogram({"t*": torch.tensor(levels)}, Path(out) / "t_star.png")
    return format_summary(summary)


def speed_of_run(out: Path, cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the speed settings its run in ``out`` used (``"auto"`` resolved there, in
    ``config.json``), so that follow-up work does not measure them again."""
    saved = out / "config.json"
    if saved.is_file():
        run = from_dict({k: v for k, v in read_json(saved).items() if k != "hash"})
        if run.hash() == cfg.hash():
            return run
    return cfg


def report(out: Path) -> str:
    """Summarise the run in ``out`` with the config it was made with (``out/config.json``)."""
    config_path = Path(out) / "config.json"
    if not config_path.is_file():
        raise ResumeError(f"{config_path} not found; run `ssni evaluate --out {out}` first")
    saved = read_json(config_path)
    saved.pop("hash", None)
    return summarize_run(out, from_dict(saved), own_config=True)
