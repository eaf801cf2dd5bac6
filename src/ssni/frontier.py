"""The accuracy-robustness frontier of a sweep (:mod:`ssni.sweep`): its plots and paired verdicts.

``frontier.png`` puts clean accuracy against robust accuracy (one protocol, default worst of N),
both with 95% Wilson intervals, one curve per method, each point tagged with the grid values that
vary along its curve (its level ``t*``, or eps). When eps varies beside other keys, each eps gets its
own panel (with the attack keys that move with it). ``robust_vs_eps.png`` puts robust accuracy
against eps, one curve per method and level.

Paired verdicts (:func:`paired_verdicts`). Is a point of a level-choosing method (SSNI) above the
frontier of the constant-level points (``ssni.reweight = "none"``) at the same eps? Its neighbours are
the constant points nearest to it in clean accuracy on each side (the lowest clean accuracy at or above
its own, the highest at or below; ties go to the more robust one). Against each neighbour, on the same
images, the clean verdicts and the robust verdicts are compared by the exact McNemar test (a two-sided
binomial sign test on the discordant samples). The point is *above* when against every neighbour it is
significantly better (p < 0.05) on one axis and significantly worse on none; *below* when a neighbour
is so against it; otherwise *not separable* at this number of images. No correction for the several
tests is applied; the p-values are all reported.
"""

from __future__ import annotations

from pathlib import Path

from .evaluate.scoring import robust_under
from .metrics import ALPHA, mcnemar_exact


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(key: str) -> str:
    last = key.split(".")[-1]
    return {"t_star": "t*"}.get(last, last)


def _tag(point: dict, keys: list[str]) -> str:
    """``"t*=300, eps=0.1"``; SSNI's ``t_star`` is its largest level, written ``T``."""
    def name(k: str) -> str:
        return "T" if k.endswith("t_star") and point.get("reweight", "none") != "none" else _short(k)

    return ", ".join(f"{name(k)}={point['values'][k]:g}" if isinstance(point["values"][k], float)
                     else f"{name(k)}={point['values'][k]}" for k in keys if k in point["values"])


def _varying(points: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for p in points for k in p["values"]))
    return [k for k in keys if len({repr(p["values"].get(k)) for p in points}) > 1]


def _curves(points: list[dict], skip: set[str]) -> dict[str, list[dict]]:
    """Points grouped into curves: same label and same values of every varying key except the ones
    the curve runs along (level keys) and ``skip``; ordered by level."""
    varying = [k for k in _varying(points) if k not in skip]
    along = [k for k in varying if _is_level(k)] or varying  # no level swept: one curve per method
    curves: dict[str, list[dict]] = {}
    for p in points:
        rest = _tag(p, [k for k in varying if k not in along])
        curves.setdefault(p["label"] + (f" ({rest})" if rest else ""), []).append(p)
    for line in curves.values():
        line.sort(key=lambda p: tuple(str(p["values"].get(k)) if not isinstance(p["values"].get(k), (int, float))
                                      else p["values"].get(k) for k in along))
    return curves


def _err(acc: dict) -> list[list[float]]:
    return [[100 * (acc["acc"] - acc["ci95"][0])], [100 * (acc["ci95"][1] - acc["acc"])]]


def plot_frontier(result: dict, path: Path) -> None:
    """Clean accuracy (x) against robust accuracy under ``result["protocol"]`` (y), 95% intervals."""
    plt, protocol = _plt(), result["protocol"]
    done = [p for p in result["points"] if p["n"]]
    attack_keys = [k for k in _varying(done) if k.startswith("attacks.")]  # eps, and a step size moved with it
    split = attack_keys and len(_varying(done)) > len(attack_keys)
    panels = list(dict.fromkeys(_tag(p, attack_keys) for p in done)) if split else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        chosen = [p for p in done if panel is None or _tag(p, attack_keys) == panel]
        stacked: dict[tuple, int] = {}  # labels of points at the same spot go one above the other
        skip = set(attack_keys) if panel is not None else set()
        for i, (name, line) in enumerate(_curves(chosen, skip).items()):
            tags = _varying(line) or [k for k in line[0]["values"] if k not in skip]
            x = [100 * p["clean"]["acc"] for p in line]
            y = [100 * p["robust"][protocol]["acc"] for p in line]
            ax.plot(x, y, "-", color=f"C{i % 10}", alpha=0.6)
            for p, xi, yi in zip(line, x, y):
                ax.errorbar([xi], [yi], xerr=_err(p["clean"]), yerr=_err(p["robust"][protocol]), fmt="o",
                            color=f"C{i % 10}", capsize=2, label=name if p is line[0] else None)
                spot = (round(xi), round(yi))  # within about one point of accuracy
                stacked[spot] = stacked.get(spot, -1) + 1
                ax.annotate(_tag(p, tags), (xi, yi), textcoords="offset points", xytext=(4, 4 + 8 * stacked[spot]),
                            fontsize=6, color=f"C{i % 10}")
        ax.set(xlabel="clean accuracy (%)", ylabel=f"robust accuracy, {protocol} (%)",
               title="all points" if panel is None else panel)
        ax.legend(fontsize=7)
    n = max(p["n"] for p in done)
    fig.suptitle(f"Accuracy-robustness frontier ({protocol}, up to {n} images, 95% Wilson intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_robust_vs_eps(result: dict, path: Path) -> None:
    """Robust accuracy under ``result["protocol"]`` against eps, one curve per method and other values."""
    plt, protocol = _plt(), result["protocol"]
    done = [p for p in result["points"] if p["n"]]
    others = [k for k in _varying(done) if not k.startswith("attacks.")]
    groups: dict[str, list[dict]] = {}
    for p in done:
        rest = _tag(p, others)
        groups.setdefault(p["label"] + (f" ({rest})" if rest else ""), []).append(p)
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (name, line) in enumerate(groups.items()):
        line.sort(key=lambda p: p["eps"])
        y = [100 * p["robust"][protocol]["acc"] for p in line]
        err = [[100 * (p["robust"][protocol]["acc"] - p["robust"][protocol]["ci95"][0]) for p in line],
               [100 * (p["robust"][protocol]["ci95"][1] - p["robust"][protocol]["acc"]) for p in line]]
        ax.errorbar([p["eps"] for p in line], y, yerr=err, fmt="o-", capsize=3, color=f"C{i % 10}", label=name)
    ax.set(xlabel="eps", ylabel=f"robust accuracy, {protocol} (%)", title="Robust accuracy vs eps (95% Wilson)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(a: dict[int, tuple[bool, bool]], b: dict[int, tuple[bool, bool]]) -> dict:
    """Per axis (clean, robust), on the samples both hold: how many only ``a`` gets right, how many
    only ``b``, and the exact McNemar p-value; ``better``: +1 if ``a`` is significantly better, -1 if worse."""
    ids = sorted(set(a) & set(b))
    out = {"n": len(ids)}
    for axis, j in (("clean", 0), ("robust", 1)):
        a_only = sum(a[i][j] and not b[i][j] for i in ids)
        b_only = sum(b[i][j] and not a[i][j] for i in ids)
        p = mcnemar_exact(a_only, b_only)
        out[axis] = {"a_only": a_only, "b_only": b_only, "p": p,
                     "better": 0 if p >= ALPHA else (1 if a_only > b_only else -1)}
    return out


def verdicts_of(rows: list[dict], keys: list[str], protocol: str) -> dict[int, tuple[bool, bool]]:
    """``{sample id: (clean correct, robust under protocol)}`` from a store's rows."""
    robust = robust_under(rows, keys, protocol)
    return {r["sample_id"]: (bool(r["clean_correct"]), bool(v)) for r, v in zip(rows, robust)}


def neighbours(point: dict, constants: list[dict], protocol: str) -> list[dict]:
    """The constant points nearest ``point`` in clean accuracy on each side (one if it lies beyond the end)."""
    clean = point["clean"]["acc"]

    def best(side: list[dict], pick) -> dict | None:
        if not side:
            return None
        edge = pick(p["clean"]["acc"] for p in side)
        return max((p for p in side if p["clean"]["acc"] == edge), key=lambda p: p["robust"][protocol]["acc"])

    above = best([p for p in constants if p["clean"]["acc"] >= clean], min)
    below = best([p for p in constants if p["clean"]["acc"] <= clean], max)
    found = [p for p in (above, below) if p is not None]
    return found[:1] if len(found) == 2 and found[0] is found[1] else found


def frontier_verdict(comparisons: list[dict]) -> str:
    """``above`` / ``below`` / ``not separable`` from the comparisons with the neighbours (see module doc)."""
    def dominates(c: dict, sign: int) -> bool:
        axes = [c["clean"]["better"] * sign, c["robust"]["better"] * sign]
        return max(axes) == 1 and min(axes) >= 0

    if comparisons and all(dominates(c, 1) for c in comparisons):
        return "above"
    if any(dominates(c, -1) for c in comparisons):
        return "below"
    return "not separable"


def _is_level(key: str) -> bool:
    return key.endswith("t_star") or key.endswith("levels")


def _constants_for(point: dict, points: list[dict]) -> list[dict]:
    """Finished constant-level points of the same purifier at the same eps and the same other grid values."""
    same = {k: v for k, v in point["values"].items() if not _is_level(k)}
    return [p for p in points if p["n"] and p["reweight"] == "none" and p["method"] == point["method"]
            and p["eps"] == point["eps"] and all(p["values"].get(k, v) == v for k, v in same.items())]


def paired_verdicts(result: dict, verdicts: dict[str, dict[int, tuple[bool, bool]]]) -> list[dict]:
    """For every finished SSNI point of ``result`` (``sweep.json``), its neighbours on the constant-level
    frontier, the paired comparisons with them and the verdict; ``verdicts``: per folder, per sample,
    (clean correct, robust under ``result["protocol"]``)."""
    protocol, out = result["protocol"], []
    for point in result["points"]:
        if not point["n"] or point["reweight"] == "none":
            continue
        near = neighbours(point, _constants_for(point, result["points"]), protocol)
        comparisons = [{"against": q["folder"], "against_label": q["label"], "against_level": q["level"],
                        **compare(verdicts[point["folder"]], verdicts[q["folder"]])} for q in near]
        out.append({"folder": point["folder"], "label": point["label"], "level": point["level"],
                    "eps": point["eps"], "protocol": protocol, "comparisons": comparisons,
                    "verdict": frontier_verdict(comparisons) if comparisons else "no constant-level points"})
    return out


def format_paired(entries: list[dict]) -> str:
    """A markdown table: each SSNI point against each neighbour, clean and robust discordant counts and p."""
    lines = ["| point | eps | against | n | clean: only point / only other (p) | "
             "robust: only point / only other (p) | verdict |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        for c in e["comparisons"] or [{}]:
            if not c:
                lines.append(f"| {e['label']}, T={e['level']} | {e['eps']:g} | - | - | - | - | {e['verdict']} |")
                continue
            cells = " | ".join(f"{c[a]['a_only']} / {c[a]['b_only']} (p = {c[a]['p']:.3g})"
                               for a in ("clean", "robust"))
            lines.append(f"| {e['label']}, T={e['level']} | {e['eps']:g} | {c['against_label']}, "
                         f"t*={c['against_level']} | {c['n']} | {cells} | {e['verdict']} |")
    return "\n".join(lines)
