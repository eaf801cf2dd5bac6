"""From per-sample rows to accuracies with confidence intervals, stated with their scoring protocol."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..metrics import wilson_interval
from .config import ExperimentConfig
from .scoring import PROTOCOLS, robust_under


def accuracy(correct: int, n: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {"acc": correct / n if n else None, "correct": correct, "n": n, "ci95": [low, high]}


def robust_by_protocol(rows: list[dict], keys: list[str], draws: int) -> dict:
    """Robust accuracy under every protocol, each with its interval and its description."""
    n = len(rows)
    return {p: {**accuracy(sum(robust_under(rows, keys, p)), n), "protocol": text.format(n=draws)}
            for p, text in PROTOCOLS.items()}


def robust_vs_draws(rows: list[dict], keys: list[str], draws: int) -> dict:
    """Robust accuracy (worst of n, majority of n) for n = 1..draws fresh draws. A sample that a later
    attack of the cascade skipped (it was broken under every protocol on all ``draws``) counts as broken
    at every n, since on fewer draws the cascade would have attacked it again
    (:func:`ssni.evaluate.scoring.robust_under`)."""
    n = len(rows)
    curve = {"draws": list(range(1, draws + 1)), "worst": [], "majority": []}
    for k in curve["draws"]:
        for p in ("worst", "majority"):
            curve[p].append(sum(robust_under(rows, keys, p, k)) / n if n else float("nan"))
    return curve


def summarize(rows: list[dict], cfg: ExperimentConfig) -> dict:
    """Clean accuracy, robust accuracy under every protocol (headline: ``evaluate.rescore``),
    the headline after each attack of the cascade, robust accuracy against the number of draws,
    and level statistics."""
    n, draws, headline = len(rows), cfg.evaluate.rescore_draws, cfg.evaluate.rescore
    keys = [f"{k}:{a.name}" for k, a in enumerate(cfg.attacks)]
    per_attack = [{"attack": a.name, "settings": a.__dict__,
                   **accuracy(sum(robust_under(rows, keys[:k + 1], headline)), n),
                   **adversarial_levels(rows, keys[k])} for k, a in enumerate(cfg.attacks)]
    levels = [t for r in rows for t in r["t_star"][-1:]]
    norms = [r["score_norm"] for r in rows if r["score_norm"] is not None]
    by_protocol = robust_by_protocol(rows, keys, draws)
    return {"config_hash": cfg.hash(), "n": n, "n_planned": cfg.data.n, "draws": draws, "headline": headline,
            "scoring": by_protocol[headline]["protocol"],
            "clean": accuracy(sum(r["clean_correct"] for r in rows), n),
            "robust": by_protocol[headline], "robust_by_protocol": by_protocol,
            "robust_vs_draws": robust_vs_draws(rows, keys, draws), "after_each_attack": per_attack,
            "t_mean": statistics.fmean(levels) if levels else 0.0,
            "t_std": statistics.pstdev(levels) if len(levels) > 1 else 0.0,
            "score_norm_mean": statistics.fmean(norms) if norms else None,
            "seconds_per_sample": statistics.fmean(r["seconds"] for r in rows) if rows else 0.0}


def adversarial_levels(rows: list[dict], key: str) -> dict:
    """Mean and std of the last round's level that the adversarial examples of attack ``key`` get
    (first fresh draw; rows stored before levels were recorded have none)."""
    levels = [t for r in rows for t in r["attacks"].get(key, {}).get("t_star", [])[-1:]]
    return {"t_adv_mean": statistics.fmean(levels) if levels else None,
            "t_adv_std": statistics.pstdev(levels) if len(levels) > 1 else None}


def write_summary(summary: dict, out: Path) -> None:
    """``summary.json`` in strict JSON: a value that is not a finite number (no samples yet) is null."""
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return [_finite(v) for v in value] if isinstance(value, (list, tuple)) else value


def pct(acc: dict) -> str:
    """``"41.5% [34.9, 48.4]"``: an accuracy with its 95% Wilson interval (``n/a`` without samples)."""
    if acc["acc"] is None:
        return "n/a (no samples)"
    return f"{100 * acc['acc']:.1f}% [{100 * acc['ci95'][0]:.1f}, {100 * acc['ci95'][1]:.1f}]"


def format_summary(summary: dict) -> str:
    if summary["n"] == 0:
        return (f"n = 0 of {summary.get('n_planned', '?')}: no samples yet; run `ssni evaluate` with this --out "
                "folder (it resumes) and report again")
    lines = [f"n = {summary['n']}, headline scoring: {summary['scoring']}"]
    if summary["n"] < summary.get("n_planned", summary["n"]):
        lines.append(f"INCOMPLETE: {summary['n']} of {summary['n_planned']} samples evaluated so far")
    lines.append(f"clean accuracy          {pct(summary['clean'])}")
    for step in summary["after_each_attack"]:
        adv = "" if step.get("t_adv_mean") is None else f"  (adversarial inputs get t* {step['t_adv_mean']:.1f})"
        lines.append(f"after {step['attack']:<17} {pct(step)}{adv}")
    for protocol, acc in summary["robust_by_protocol"].items():
        mark = " <- headline" if protocol == summary["headline"] else ""
        lines.append(f"robust, {protocol:<15} {pct(acc)}  ({acc['protocol']}){mark}")
    lines.append(f"t* mean {summary['t_mean']:.1f} (std {summary['t_std']:.1f}), "
                 f"{summary['seconds_per_sample']:.2f} s per sample")
    for check in summary.get("sanity", {}).get("checks", []):
        lines.append(format_check(check))
    if summary.get("sanity") and not summary["sanity"]["all_passed"]:
        lines.append("!!! SANITY CHECKS FAILED: these robust accuracies may be inflated "
                     "(gradient masking or an attack that has not converged) !!!")
    return "\n".join(lines)


def format_check(check: dict) -> str:
    """``[ok    ]``, ``[FAILED]`` or ``[info  ]`` (an informative entry: no threshold, not in ``all_passed``)."""
    flag = "info  " if check.get("informative") else "ok    " if check["passed"] else "FAILED"
    return f"[{flag}] {check['check']}: {check['detail']}"
