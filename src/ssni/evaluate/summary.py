"""From per-sample rows to accuracies with confidence intervals, stated with their scoring protocol."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..metrics import wilson_interval
from .config import ExperimentConfig

PROTOCOLS = {"single": "one evaluation on fresh randomness",
             "worst": "worst case over {n} fresh evaluations",
             "majority": "majority vote over {n} fresh evaluations"}


def accuracy(correct: int, n: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {"acc": correct / n if n else float("nan"), "correct": correct, "n": n, "ci95": [low, high]}


def summarize(rows: list[dict], cfg: ExperimentConfig) -> dict:
    """Clean accuracy, robust accuracy after each attack (cumulative worst case) and level statistics."""
    n = len(rows)
    still = [r["clean_correct"] == 1 for r in rows]
    per_attack = []
    for k, a in enumerate(cfg.attacks):
        key = f"{k}:{a.name}"
        still = [ok and r["attacks"].get(key, {"correct": ok})["correct"] for ok, r in zip(still, rows)]
        per_attack.append({"attack": a.name, "settings": a.__dict__, **accuracy(sum(still), n)})
    levels = [t for r in rows for t in r["t_star"][-1:]]
    norms = [r["score_norm"] for r in rows if r["score_norm"] is not None]
    protocol = PROTOCOLS[cfg.evaluate.rescore].format(n=cfg.evaluate.rescore_draws)
    return {"config_hash": cfg.hash(), "n": n, "scoring": protocol,
            "clean": accuracy(sum(r["clean_correct"] for r in rows), n),
            "robust": accuracy(sum(r["robust"] for r in rows), n), "after_each_attack": per_attack,
            "t_mean": statistics.fmean(levels) if levels else 0.0,
            "t_std": statistics.pstdev(levels) if len(levels) > 1 else 0.0,
            "score_norm_mean": statistics.fmean(norms) if norms else None,
            "seconds_per_sample": statistics.fmean(r["seconds"] for r in rows) if rows else 0.0}


def write_summary(summary: dict, out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def format_summary(summary: dict) -> str:
    def pct(acc: dict) -> str:
        return f"{100 * acc['acc']:.1f}% [{100 * acc['ci95'][0]:.1f}, {100 * acc['ci95'][1]:.1f}]"

    lines = [f"n = {summary['n']}, scoring: {summary['scoring']}", f"clean accuracy      {pct(summary['clean'])}"]
    for step in summary["after_each_attack"]:
        lines.append(f"after {step['attack']:<13} {pct(step)}")
    lines.append(f"robust (worst case) {pct(summary['robust'])}")
    lines.append(f"t* mean {summary['t_mean']:.1f} (std {summary['t_std']:.1f}), "
                 f"{summary['seconds_per_sample']:.2f} s per sample")
    for check in summary.get("sanity", {}).get("checks", []):
        flag = "ok    " if check["passed"] else "FAILED"
        lines.append(f"[{flag}] {check['check']}: {check['detail']}")
    if summary.get("sanity") and not summary["sanity"]["all_passed"]:
        lines.append("!!! SANITY CHECKS FAILED: these robust accuracies may be inflated by gradient masking !!!")
    return "\n".join(lines)
