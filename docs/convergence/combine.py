"""Gather the per-study convergence.json files into one JSON, one plot and a markdown table.

Usage: python docs/convergence/combine.py OUT_DIR STUDY_DIR [STUDY_DIR ...]
       python docs/convergence/combine.py --rechoose OUT_DIR
The second form applies the current choice rule to the studies already in OUT_DIR/convergence.json
(keeping the first choice recorded there as ``choice_before``) and prints the old and new verdicts.
"""

import json
import sys
from pathlib import Path

from ssni.evaluate.convergence import RULE, choose_budget, plot_convergence


def cell(acc: dict) -> str:
    return f"{acc['correct']}/{acc['n']} [{100 * acc['ci95'][0]:.0f}, {100 * acc['ci95'][1]:.0f}]"


def table(results: list[dict]) -> str:
    lines = ["| defense | attack | steps | EOT | restarts | clean | worst of N | majority | single "
             "| any iterate | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        seen = set()
        for p in sorted(res["points"], key=lambda p: (p["attack"], p["eot"], p["steps"], p["restarts"])):
            if p["folder"] in seen:
                continue
            seen.add(p["folder"])
            lines.append(f"| {res['label']} | {p['attack']} | {p['steps']} | {p['eot']} | {p['restarts']} | "
                         f"{p['clean']['correct']}/{p['clean']['n']} | {cell(p['worst'])} | "
                         f"{cell(p['majority'])} | {cell(p['single'])} | {cell(p['any_iterate'])} | "
                         f"{p['seconds']:.0f} |")
    return "\n".join(lines)


def rechoose(out: Path) -> str:
    """Re-apply the rule to a combined convergence.json; a markdown table of the verdicts before and now.
    Points saved without per-sample verdicts (``robust_ids``) are compared by their counts."""
    path = out / "convergence.json"
    combined = json.loads(path.read_text())
    lines = ["| defense | attack | before | now | compared on |", "|---|---|---|---|---|"]
    for res in combined["studies"]:
        res.setdefault("choice_before", res["choice"])
        res["rule"], res["choice"] = RULE, choose_budget(res["points"])
        paired = all("robust_ids" in p for p in res["points"])
        for attack, choice in res["choice"].items():
            lines.append(f"| {res['label']} | {attack} | {res['choice_before'][attack]['verdict']} | "
                         f"{choice['verdict']} | {'per-sample verdicts' if paired else 'counts only'} |")
    path.write_text(json.dumps(combined, indent=2) + "\n")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1] == "--rechoose":
        print(rechoose(Path(sys.argv[2])))
        return
    out, studies = Path(sys.argv[1]), [Path(s) for s in sys.argv[2:]]
    results = [json.loads((s / "convergence.json").read_text()) for s in studies]
    measured = {}  # a budget point measured by two studies (same defense) is shown once
    for res in results:
        defense = res["label"].split(", base")[0]
        res["points"] = [p for p in res["points"] if measured.setdefault((defense, p["folder"], p["axis"]), res["label"])
                         == res["label"]]
    for res in results:  # the choice under the current rule (a study may have been written by an older one)
        res["rule"], res["choice"] = RULE, choose_budget(res["points"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps({"studies": results}, indent=2) + "\n")
    plot_convergence(results, out / "convergence.png")
    (out / "table.md").write_text(table(results) + "\n")
    for res in results:
        for attack, choice in res["choice"].items():
            print(f"{res['label']}, {attack}: {choice['verdict']}")
            for axis, detail in choice["axes"].items():
                print("\n".join(f"  {axis}: {line}" for line in detail["reasoning"]))
    print(table(results))


if __name__ == "__main__":
    main()
