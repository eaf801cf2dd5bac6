"""Convergence of an attack's budget: robust accuracy (worst of N fresh draws) along a budget ladder.

A configured defense is evaluated on the validation split with one attack at a ladder of budgets.
Each axis (``steps``, ``eot``, ``restarts``) varies alone, the other settings staying at the
configured base; every budget point is one :func:`ssni.evaluate.runner.evaluate` run in its own
sub-folder of the output (so an interrupted study resumes point by point) and is summarised by
:func:`ssni.evaluate.summary.summarize` (single, majority, worst of N, any iterate, Wilson 95%
intervals).

Choice rule (issue 14). Along an axis with rungs ``v_0 < v_1 < ...`` the axis is converged at the
first rung ``i`` from which every larger rung measured moves robust accuracy by less than the half-width
of rung ``i``'s 95% interval (:func:`ssni.metrics.changed_beyond_noise`, the criterion ``--sanity`` uses
too): not only the next doubling but the largest budget tried must agree with it. The rule is applied
to each protocol in ``RULE_PROTOCOLS`` (worst of N, the headline, and the majority of the same N draws,
which converges more slowly) and the axis takes the largest rung any of them needs. The chosen budget
takes each axis's converged rung; if an axis never satisfies the rule the study is "not converged
within the ladder". The axes are measured at the base of the others (a cross, not a grid): the choice
assumes the effects of steps and EOT do not interact much, which the README states.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..metrics import changed_beyond_noise
from .config import ExperimentConfig
from .registries import ATTACKS
from .runner import evaluate
from .store import RESULTS_FILE, Store
from .summary import summarize

AXES = ("steps", "eot", "restarts")
DEFAULT_LADDER = {"steps": (10, 20, 50, 100, 200), "eot": (1, 2, 4, 8, 16), "restarts": (1, 2, 4)}
NOT_CONVERGED = "not converged within the ladder"
RULE_PROTOCOLS = ("worst", "majority")  # the N-draw verdicts the choice rule must see converged
RULE = ("per axis and protocol (worst of N, majority), the first rung from which every larger rung measured "
        "changes robust accuracy by less than the 95% Wilson half-width at that rung; the axis takes the "
        "largest rung any protocol needs")


def parse_ladder(text: str) -> dict[str, tuple[int, ...]]:
    """``"steps=10,20,50 eot=1,2,4"`` (spaces or semicolons between axes) -> ``{axis: rungs}``."""
    from ..errors import ConfigError

    ladder = {}
    for part in text.replace(";", " ").split():
        axis, sep, values = part.partition("=")
        if not sep or axis not in AXES:
            raise ConfigError(f"ladder entry {part!r}: write AXIS=v1,v2,... with AXIS one of {list(AXES)}, "
                              "e.g. --ladder 'steps=10,20,50 eot=1,2,4'")
        try:
            rungs = sorted({int(v) for v in values.split(",") if v})
        except ValueError:
            raise ConfigError(f"ladder entry {part!r}: the rungs must be whole numbers") from None
        if not rungs or rungs[0] < 1:
            raise ConfigError(f"ladder entry {part!r}: give at least one rung, each >= 1")
        ladder[axis] = tuple(rungs)
    return ladder


def budget_points(cfg: ExperimentConfig, attack: str, ladder: dict[str, tuple[int, ...]]) -> list[dict]:
    """The budget points of one attack: each axis's rungs at the base (configured) value of the others.
    The base point appears once per axis it lies on (it is run once: same folder)."""
    base = cfg.attacks[0]
    points = []
    for axis, rungs in ladder.items():
        if axis not in ATTACKS[attack].reads:  # e.g. restarts of PGD
            continue
        for value in rungs:
            budget = {"steps": base.steps, "eot": base.eot, "restarts": base.restarts, axis: value}
            points.append({"attack": attack, "axis": axis, **budget})
    return points


def point_config(cfg: ExperimentConfig, point: dict) -> ExperimentConfig:
    """The configured experiment with the first attack alone, renamed and set to the point's budget."""
    a = replace(cfg.attacks[0], name=point["attack"], steps=point["steps"], eot=point["eot"],
                restarts=point["restarts"])
    return replace(cfg, attacks=(a,))


def point_folder(point: dict) -> str:
    return f"{point['attack']}-steps{point['steps']}-eot{point['eot']}-restarts{point['restarts']}"


def stored_rows(out: Path, cfg: ExperimentConfig) -> list[dict]:
    store = Store(out / RESULTS_FILE, cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    rows = store.rows()
    store.close()
    return rows


def measure_point(cfg: ExperimentConfig, point: dict, out: Path, weights_dir: Path | None,
                  progress: bool) -> dict:
    """Run (or resume) one budget point into ``out/<folder>`` and summarise it."""
    folder = out / point_folder(point)
    pcfg = point_config(cfg, point)
    start = time.time()
    evaluate(pcfg, folder, weights_dir, progress=progress)
    wall = time.time() - start
    rows = stored_rows(folder, pcfg)
    s = summarize(rows, pcfg)
    keep = ("acc", "correct", "n", "ci95")
    cost = point["steps"] * point["eot"] * point["restarts"]
    return {**point, "folder": folder.name, "gradient_evaluations": cost,
            "clean": {k: s["clean"][k] for k in keep},
            **{p: {k: acc[k] for k in keep} for p, acc in s["robust_by_protocol"].items()},
            "seconds": sum(r["seconds"] for r in rows), "wall_seconds_this_call": round(wall, 1)}


def first_stable(rungs: list[int], correct: list[int], n: int, protocol: str = "worst") -> dict:
    """The choice rule on one axis and protocol: the first rung from which every larger rung moves the
    accuracy (``correct`` of ``n``) by less than that rung's interval half-width. Returns the rung (or
    ``None``) and the reasoning."""
    lines, chosen = [], None
    for i, (rung, base) in enumerate(zip(rungs[:-1], correct)):
        moves = [(later, other, *changed_beyond_noise(base, other, n))
                 for later, other in zip(rungs[i + 1:], correct[i + 1:])]
        half = moves[0][3]
        detail = ", ".join(f"{later}: {other}/{n}" for later, other, _, _ in moves)
        stable = not any(moved for _, _, moved, _ in moves)
        lines.append(f"{protocol} at {rung}: {base}/{n} (half-width {half * n:.1f} samples) vs {detail}: "
                     + ("every larger rung within" if stable else "a larger rung moves beyond"))
        if stable:
            chosen = rung
            break
    if chosen is None:
        lines.append(NOT_CONVERGED if len(rungs) > 1 else "one rung only: nothing to compare")
    return {"chosen": chosen, "reasoning": lines}


def choose_budget(points: list[dict], protocols: tuple[str, ...] = RULE_PROTOCOLS) -> dict:
    """Per attack, the choice rule on every axis it was measured on and every protocol in ``protocols``
    (an axis takes the largest rung any protocol needs), and the budget it gives."""
    out = {}
    for attack in dict.fromkeys(p["attack"] for p in points):
        axes, budget = {}, {}
        for axis in dict.fromkeys(p["axis"] for p in points if p["attack"] == attack):
            line = sorted((p for p in points if p["attack"] == attack and p["axis"] == axis),
                          key=lambda p: p[axis])
            per_protocol = [first_stable([p[axis] for p in line], [p[protocol]["correct"] for p in line],
                                         line[0][protocol]["n"], protocol) for protocol in protocols]
            chosen = [c["chosen"] for c in per_protocol]
            axes[axis] = {"chosen": None if None in chosen else max(chosen),
                          "reasoning": [line for c in per_protocol for line in c["reasoning"]]}
            budget[axis] = axes[axis]["chosen"]
        converged = all(v is not None for v in budget.values())
        out[attack] = {"axes": axes, "budget": budget if converged else None, "converged": converged,
                       "verdict": ", ".join(f"{k} {v}" for k, v in budget.items()) if converged else
                       NOT_CONVERGED + " (" + ", ".join(k for k, v in budget.items() if v is None) + ")"}
    return out


def run_convergence(cfg: ExperimentConfig, out: Path, attacks: list[str] | None = None,
                    ladder: dict[str, tuple[int, ...]] | None = None, weights_dir: Path | None = None,
                    progress: bool = True, label: str | None = None) -> dict:
    """The whole study on the validation split: every point of every attack's ladder, then
    ``out/convergence.json`` and ``out/convergence.png``. ``attacks`` default: the first
    configured attack's name."""
    cfg = replace(cfg, data=replace(cfg.data, split="val"))
    ladder = ladder or DEFAULT_LADDER
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points, seen = [], {}
    for attack in attacks or [cfg.attacks[0].name]:
        for point in budget_points(cfg, attack, ladder):
            key = point_folder(point)
            if key not in seen:
                seen[key] = measure_point(cfg, point, out, weights_dir, progress)
            points.append({**seen[key], "axis": point["axis"]})
    result = {"label": label or f"{cfg.purifier.method} + ssni {cfg.ssni.reweight}", "split": "val",
              "n": cfg.data.n, "draws": cfg.evaluate.rescore_draws, "config_hash_base": cfg.hash(),
              "base_attack": cfg.attacks[0].__dict__, "ladder": {k: list(v) for k, v in ladder.items()},
              "rule": RULE,
              "points": points, "choice": choose_budget(points)}
    (out / "convergence.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_convergence([result], out / "convergence.png")
    return result


def plot_convergence(results: list[dict], path: Path, protocols: tuple[str, ...] = RULE_PROTOCOLS) -> None:
    """Robust accuracy (one panel per protocol the rule reads: worst of N, majority) with its 95%
    interval against the budget (gradient evaluations per sample and restart: steps x EOT x restarts,
    log scale), one line per defense/attack/axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 4.8), sharey=True)
    for ax, protocol in zip(list(axes) if len(protocols) > 1 else [axes], protocols):
        _plot_protocol(ax, results, protocol)
    axes_list = list(axes) if len(protocols) > 1 else [axes]
    axes_list[0].set_ylabel("robust accuracy (%)")
    axes_list[-1].legend(fontsize=6)
    fig.suptitle("Attack convergence (validation split, 95% Wilson)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_protocol(ax, results: list[dict], protocol: str) -> None:
    styles = {"steps": "o-", "eot": "s--", "restarts": "^:"}
    lines = [(r, a, x) for r in results for a in dict.fromkeys(p["attack"] for p in r["points"])
             for x in dict.fromkeys(p["axis"] for p in r["points"])]
    for i, (res, attack, axis) in enumerate(lines):
        line = sorted((p for p in res["points"] if p["attack"] == attack and p["axis"] == axis),
                      key=lambda p: p["gradient_evaluations"])
        if not line:
            continue
        x = [p["gradient_evaluations"] * (1 + 0.03 * i) for p in line]  # a small shift keeps bars apart
        y = [100 * p[protocol]["acc"] for p in line]
        err = [[100 * (p[protocol]["acc"] - p[protocol]["ci95"][0]) for p in line],
               [100 * (p[protocol]["ci95"][1] - p[protocol]["acc"]) for p in line]]
        ax.errorbar(x, y, yerr=err, fmt=styles[axis], capsize=3, color=f"C{i % 10}",
                    label=f"{res['label']}, {attack}, {axis} " + ",".join(str(p[axis]) for p in line))
    ax.set_xscale("log", base=2)
    ticks = sorted({p["gradient_evaluations"] for r in results for p in r["points"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="budget: steps x EOT x restarts (gradient evaluations per sample)",
           title="worst of N (headline)" if protocol == "worst" else protocol)
