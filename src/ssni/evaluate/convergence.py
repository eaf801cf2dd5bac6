"""Convergence of an attack's budget: robust accuracy (worst of N fresh draws) along a budget ladder.

A configured defense is evaluated on the validation split with one attack at a ladder of budgets.
Each axis (``steps``, ``eot``, ``restarts``) varies alone, the other settings staying at the
configured base; every budget point is one :func:`ssni.evaluate.runner.evaluate` run in its own
sub-folder of the output (so an interrupted study resumes point by point) and is summarised by
:func:`ssni.evaluate.summary.summarize` (single, majority, worst of N, any iterate, Wilson 95%
intervals).

Choice rule (issue 21; it replaces issue 14's unpaired Wilson half-width, which let 16 -> 12 of 32
pass as noise). Every budget point is measured on the same samples with the same fresh scoring draws,
so two budgets are compared *paired*, on per-sample verdicts: of the samples robust at the smaller
budget, ``lost`` are broken at the larger one; of those broken, ``gained`` are robust there. Along an
axis with rungs ``v_0 < v_1 < ...`` the axis is converged at the first rung ``i`` such that

- no larger rung breaks significantly more samples: one-sided exact sign (McNemar) test on the
  discordant pairs, ``P(Bin(lost + gained, 1/2) >= lost) >= ALPHA`` (0.05) for every ``j > i``, and
- its robust count is at most ``TOLERANCE * n`` samples (5 points of accuracy) above the largest
  rung's (few samples give a sign test little power: 4 of 32 lost and none gained has p = 0.0625),

and the rule gives no verdict at all unless at least ``MIN_ATTACKED`` (10) samples were attacked
(correct when clean): an attack that ran on nothing, or on two samples, is not "converged". At 0 robust
with enough samples attacked a rung is converged (no larger budget can break more), and the largest
rung's counts are reported beside the chosen ones. Points saved before per-sample verdicts were stored
(``robust_ids``) are compared by their counts, taking the fewest discordant pairs the counts allow
(:func:`ssni.metrics.budget_move`), which errs towards "not converged". The rule is applied to each
protocol in ``RULE_PROTOCOLS`` (worst of N, the headline, and the majority of the same N draws, which
converges more slowly) and the axis takes the largest rung any of them needs. If an axis never satisfies
the rule the study is "not converged within the ladder". The axes are measured at the base of the others
(a cross, not a grid): the choice assumes the effects of steps and EOT do not interact much, which the
README states. ``--sanity`` applies the same test and tolerance to 2x steps and 2x EOT
(:func:`ssni.attacks.checks.sanity_checks`).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..metrics import ALPHA, MIN_ATTACKED, TOLERANCE, budget_move, describe_move, dropped_beyond
from .config import ExperimentConfig
from .registries import ATTACKS
from .runner import evaluate
from .scoring import robust_under
from .store import RESULTS_FILE, stored_rows
from .summary import summarize

AXES = ("steps", "eot", "restarts")
DEFAULT_LADDER = {"steps": (10, 20, 50, 100, 200), "eot": (1, 2, 4, 8, 16), "restarts": (1, 2, 4)}
NOT_CONVERGED = "not converged within the ladder"
RULE_PROTOCOLS = ("worst", "majority")  # the N-draw verdicts the choice rule must see converged
RULE = ("per axis and protocol (worst of N, majority), on per-sample verdicts: the first rung that no larger rung "
        f"beats by a one-sided exact sign test on the discordant pairs (p < {ALPHA}) and whose robust count is within "
        f"{TOLERANCE:.0%} of the samples of the largest rung's, with at least {MIN_ATTACKED} samples attacked; the "
        "axis takes the largest rung any protocol needs")


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


def measure_point(cfg: ExperimentConfig, point: dict, out: Path, weights_dir: Path | None,
                  progress: bool) -> dict:
    """Run (or resume) one budget point into ``out/<folder>`` and summarise it."""
    folder = out / point_folder(point)
    pcfg = point_config(cfg, point)
    start = time.time()
    evaluate(pcfg, folder, weights_dir, progress=progress)
    wall = time.time() - start
    rows = stored_rows(folder / RESULTS_FILE, pcfg)
    s = summarize(rows, pcfg)
    keep = ("acc", "correct", "n", "ci95")
    cost = point["steps"] * point["eot"] * point["restarts"]
    keys = [f"{k}:{a.name}" for k, a in enumerate(pcfg.attacks)]
    robust_ids = {p: [r["sample_id"] for r, ok in zip(rows, robust_under(rows, keys, p)) if ok]
                  for p in s["robust_by_protocol"]}  # per-sample verdicts: the rule compares budgets paired
    return {**point, "folder": folder.name, "gradient_evaluations": cost,
            "clean": {k: s["clean"][k] for k in keep}, "attacked": s["clean"]["correct"],
            **{p: {k: acc[k] for k in keep} for p, acc in s["robust_by_protocol"].items()},
            "robust_ids": robust_ids,
            "seconds": sum(r["seconds"] for r in rows), "wall_seconds_this_call": round(wall, 1)}


def first_stable(rungs: list[int], correct: list[int], n: int, protocol: str = "worst",
                 robust_ids: list | None = None, attacked: int | None = None) -> dict:
    """The choice rule on one axis and protocol (module docstring): the first rung that no larger rung
    beats by a significant sign test on the discordant pairs and whose robust count is within
    ``TOLERANCE * n`` of the largest rung's. ``robust_ids[i]``: the ids of the samples robust at rung
    ``i`` (the paired test); without them the counts alone are used (:func:`ssni.metrics.budget_move`).
    ``attacked``: clean-correct samples (default ``n``); below ``MIN_ATTACKED`` there is no verdict.
    Returns the rung (or ``None``), the reasoning, and the counts at the chosen and the largest rung."""
    attacked = n if attacked is None else attacked
    ids = robust_ids if robust_ids is not None else [None] * len(rungs)
    out = {"chosen": None, "reasoning": [], "largest": {"rung": rungs[-1], "correct": correct[-1], "n": n}}
    if attacked < MIN_ATTACKED:
        out["reasoning"].append(f"{protocol}: {attacked} of {n} samples were attacked (correct when clean); "
                                f"the rule needs at least {MIN_ATTACKED}: no verdict")
        return out
    for i, rung in enumerate(rungs[:-1]):
        moves = [(later, budget_move(correct[i], correct[j], n, ids[i], ids[j]))
                 for j, later in enumerate(rungs) if j > i]
        stable = not any(dropped_beyond(move, tolerance=TOLERANCE if later == rungs[-1] else None)
                         for later, move in moves)
        detail = ", ".join(f"{later}: {describe_move(move)}" for later, move in moves)
        out["reasoning"].append(
            f"{protocol} at {rung}: vs {detail}; {correct[i] - correct[-1]:+d} against the largest rung "
            f"(tolerance {TOLERANCE * n:.1f} samples): "
            + ("converged" if stable else "a larger rung breaks more"))
        if stable:
            out.update(chosen=rung, correct=correct[i])
            break
    if out["chosen"] is None:
        out["reasoning"].append(NOT_CONVERGED if len(rungs) > 1 else "one rung only: nothing to compare")
    return out


def _axis_rule(line: list[dict], axis: str, protocol: str) -> dict:
    """:func:`first_stable` on one axis's points (sorted by rung), paired where they hold robust ids."""
    paired = all(protocol in p.get("robust_ids", {}) for p in line)
    return first_stable([p[axis] for p in line], [p[protocol]["correct"] for p in line], line[0][protocol]["n"],
                        protocol, [p["robust_ids"][protocol] for p in line] if paired else None,
                        min(p.get("attacked", p.get("clean", {}).get("correct", p[protocol]["n"])) for p in line))


def _axis_choice(line: list[dict], axis: str, protocols: tuple[str, ...]) -> dict:
    """One axis: every protocol's rule; the axis takes the largest rung any protocol needs, and reports the
    counts at that rung beside those at the largest rung."""
    rules = {protocol: _axis_rule(line, axis, protocol) for protocol in protocols}
    chosen = [r["chosen"] for r in rules.values()]
    rung = None if None in chosen else max(chosen)
    at = {p[axis]: p for p in line}
    counts = lambda point: ", ".join(f"{q} {point[q]['correct']}/{point[q]['n']}" for q in protocols)  # noqa: E731
    summary = (f"{axis} {rung} ({counts(at[rung])}; largest rung {line[-1][axis]}: {counts(line[-1])})"
               if rung is not None else None)
    return {"chosen": rung, "summary": summary, "largest": line[-1][axis],
            "at_chosen": None if rung is None else {q: at[rung][q]["correct"] for q in protocols},
            "at_largest": {q: line[-1][q]["correct"] for q in protocols},
            "paired": all(protocol in p.get("robust_ids", {}) for p in line for protocol in protocols),
            "reasoning": [text for r in rules.values() for text in r["reasoning"]]}


def choose_budget(points: list[dict], protocols: tuple[str, ...] = RULE_PROTOCOLS) -> dict:
    """Per attack, the choice rule on every axis it was measured on and every protocol in ``protocols``
    (an axis takes the largest rung any protocol needs), and the budget it gives."""
    out = {}
    for attack in dict.fromkeys(p["attack"] for p in points):
        axes = {}
        for axis in dict.fromkeys(p["axis"] for p in points if p["attack"] == attack):
            line = sorted((p for p in points if p["attack"] == attack and p["axis"] == axis), key=lambda p: p[axis])
            axes[axis] = _axis_choice(line, axis, protocols)
        budget = {axis: a["chosen"] for axis, a in axes.items()}
        converged = all(v is not None for v in budget.values())
        out[attack] = {"axes": axes, "budget": budget if converged else None, "converged": converged,
                       "verdict": "; ".join(a["summary"] for a in axes.values()) if converged else
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
    axes_list = list(axes) if len(protocols) > 1 else [axes]
    for ax, protocol in zip(axes_list, protocols):
        _plot_protocol(ax, results, protocol)
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
