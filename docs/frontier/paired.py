"""Paired verdicts of a finished (or partial) sweep under several scoring protocols.

    python docs/frontier/paired.py SWEEP_DIR [--protocol worst majority single] [--out FILE.md]

For each SSNI point: its constant-level neighbours on the frontier (nearest in clean accuracy on each
side) and the exact McNemar tests of the clean and robust verdicts on the same images
(:mod:`ssni.frontier`), then the same tests against DiffPure at the same level (SSNI's T = DiffPure's
t*). Reads ``SWEEP_DIR/sweep.json`` and each point's store with the config it was made with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssni.evaluate.config import from_dict
from ssni.evaluate.store import RESULTS_FILE, Store
from ssni.frontier import compare, format_paired, paired_verdicts, verdicts_of


def point_verdicts(folder: Path, protocol: str) -> dict[int, tuple[bool, bool]]:
    store = Store(folder / RESULTS_FILE, None, None)  # read with the config the store was made with
    cfg, rows = from_dict(store.config()), store.rows()
    store.close()
    return verdicts_of(rows, [f"{k}:{a.name}" for k, a in enumerate(cfg.attacks)], protocol)


def same_level(result: dict, verdicts: dict) -> list[str]:
    """SSNI at T against DiffPure at t* = T (same eps): the demo's comparison, paired."""
    lines = ["| point | eps | against | n | clean: only point / only other (p) | robust: only point / only other (p) |",
             "|---|---|---|---|---|---|"]
    done = [p for p in result["points"] if p["n"]]
    for p in (q for q in done if q["reweight"] != "none"):
        for c in (q for q in done if q["reweight"] == "none" and q["level"] == p["level"] and q["eps"] == p["eps"]):
            r = compare(verdicts[p["folder"]], verdicts[c["folder"]])
            cells = " | ".join(f"{r[a]['a_only']} / {r[a]['b_only']} (p = {r[a]['p']:.3g})" for a in ("clean", "robust"))
            lines.append(f"| {p['label']}, T={p['level']} | {p['eps']:g} | {c['label']}, t*={c['level']} | {r['n']} | "
                         f"{cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--protocol", nargs="+", default=["worst", "majority", "single"])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    args = parser.parse_args()
    result = json.loads((args.sweep / "sweep.json").read_text())
    text = []
    for protocol in args.protocol:
        result["protocol"] = protocol
        verdicts = {p["folder"]: point_verdicts(args.sweep / p["folder"], protocol)
                    for p in result["points"] if p["n"]}
        text += [f"## Robust = {protocol}", "", "Against the constant-level neighbours (nearest in clean accuracy "
                 "on each side):", "", format_paired(paired_verdicts(result, verdicts)), "",
                 "Against DiffPure at the same level:", "", *same_level(result, verdicts), ""]
    print("\n".join(text))
    if args.out:
        args.out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
