"""The tables of docs/adaptive/README.md from the runs of run.sh.

Usage: python docs/adaptive/tabulate.py OUT_ROOT   (the folder given to run.sh; prints markdown rows)

Per split and attack (`ssni evaluate` folders SPLIT-ATTACK): robust / 32 [95% Wilson, %] under worst, majority
and single of the 8 fresh draws and any iterate, and the quartiles (min, 25%, median, 75%, max) of the level
and score norm the stored adversarial example gets on the first fresh draw. Then, from SPLIT-adaptive-trace.json
(trace.py), the adaptive attack's two candidates scored on the same draws: the feasible-set output alone
(with its own score norms and l_inf distances) and the unconstrained APGD output.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import torch

from ssni.metrics import wilson_interval

ATTACKS = ("pgd", "apgd", "adaptive", "transfer")
PROTOCOLS = ("worst", "majority", "single", "any_iterate")


def cell(correct: int, n: int) -> str:
    low, high = wilson_interval(correct, n)
    return f"{correct} [{100 * low:.0f}, {100 * high:.0f}]"


def quartiles(values: list[float], digits: int = 0) -> str:
    q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    return ", ".join(f"{v:.{digits}f}" for v in q.tolist())


def run_row(folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    by = summary["robust_by_protocol"]
    rows = sqlite3.connect(folder / "results.sqlite").execute("select attacks from samples").fetchall()
    entries = [entry for (text,) in rows for entry in json.loads(text).values()]
    levels = [entry["t_star"][0] for entry in entries if entry["t_star"]]
    norms = [entry["score_norm"] for entry in entries if entry["score_norm"] is not None]
    cells = [cell(by[p]["correct"], by[p]["n"]) for p in PROTOCOLS]
    return " | ".join([*cells, quartiles(levels), quartiles(norms)])


def trace_rows(path: Path) -> list[str]:
    record = json.loads(path.read_text())
    images, candidates = record["images"], record["summary"]["candidates"]
    out = []
    for k, name in enumerate(("feasible-set candidate alone", "unconstrained APGD candidate alone")):
        c = candidates[k]
        norms = [image["e"][k] for image in images]
        dist = [image["linf"][k] for image in images]
        clean = sum(image["is_clean"][k] for image in images)
        out.append(f"{name} | {cell(c['worst'], c['n'])} | {cell(c['majority'], c['n'])} | "
                   f"{cell(c['single'], c['n'])} | e: {quartiles(norms)} | l_inf: {quartiles(dist, 3)} | "
                   f"clean image: {clean}")
    feasible = [image["run_max_linf_feasible"] for image in images]
    share = [image["run_feasible_share"] for image in images]
    out.append(f"feasible-set run | largest l_inf of a feasible pass: {quartiles(feasible, 3)} | "
               f"share of feasible passes: {quartiles(share, 2)}")
    return out


def main() -> None:
    root = Path(sys.argv[1])
    for split in ("val", "test"):
        for attack in ATTACKS:
            folder = root / f"{split}-{attack}"
            if (folder / "summary.json").is_file():
                print(f"| {split} | {attack} | {run_row(folder)} |")
        trace = root / f"{split}-adaptive-trace.json"
        if trace.is_file():
            for row in trace_rows(trace):
                print(f"| {split} | {row} |")


if __name__ == "__main__":
    main()
