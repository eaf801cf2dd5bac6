"""``ssni sweep``: a grid of evaluations, one resumable store per point, and the accuracy-robustness frontier.

A sweep crosses one or more experiment configs with a grid of config values
(``purifier.diffpure.t_star=50,100,300``, ``attacks.0.eps=0.1,0.3``). Each point is one
:func:`ssni.evaluate.evaluate` run in its own folder ``OUT/<config stem>/<key=value,...>``, so a
sweep stops and resumes anywhere: finished points are skipped, a half-finished one resumes from
its last committed batch.

Which configs an axis reaches. An axis applies to a config whose resolved config holds its key:
``purifier.<method>.key`` (or a flat ``purifier.key`` of the method's table) only configs of that
method, ``attacks.K.key`` only configs whose K-th attack reads ``key``, ``ssni.*`` (except
``ssni.reweight``) only configs with SSNI on (and a purifier), since otherwise they change nothing. A config
runs once per combination of the axes that apply to it, once if none does. ``STEM:key=values``
(``STEM1,STEM2:...`` for several) restricts an axis to the configs with those file stems and, for
them, replaces an unscoped axis of the same key. An axis that applies to no config, and a scope that
names no config, are errors. Points with the same config hash (they differ only in speed-only keys,
:data:`ssni.evaluate.config.SPEED_ONLY`, or not at all) are refused as duplicates.

Linked keys move together: ``attacks.0.eps+attacks.0.step_size=0.1+0.02,0.3+0.05`` is one axis of
two points (a step size that follows eps).

Outputs: ``sweep.json`` (every point's clean accuracy and robust accuracy under every protocol with
95% Wilson intervals, its levels; nothing time-dependent, so a resumed sweep writes the same file),
``table.md``, ``times.json``, ``frontier.png`` (clean against robust accuracy, one curve per method,
one panel per eps when other keys vary too), ``robust_vs_eps.png`` when eps varies, and, when the
sweep holds both SSNI and constant-level points, ``paired.md`` / ``paired.json``: each SSNI point
against its constant-level neighbours on the same images (:func:`ssni.frontier.paired_verdicts`).
"""

from __future__ import annotations

import itertools
import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .evaluate.config import SPEED_ONLY, ExperimentConfig, load_config
from .evaluate.runner import evaluate
from .evaluate.scoring import PROTOCOLS
from .evaluate.store import RESULTS_FILE, stored_rows
from .evaluate.summary import pct, summarize
from .folders import claim

PURIFIER_NAMES = {"diffpure": "DiffPure", "gdmp": "GDMP", "gns": "GNS", "none": "undefended"}
REWEIGHT_NAMES = {"sigmoid": "SSNI-N", "linear": "SSNI-L"}


@dataclass(frozen=True)
class Axis:
    """One ``--grid`` entry: dotted config keys (several, joined by ``+``, move together), their values
    (one tuple per point, a value per key), and the config stems it is limited to."""

    key: str  # "attacks.0.eps" or "attacks.0.eps+attacks.0.step_size"
    values: tuple[tuple, ...]
    scope: tuple[str, ...] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.key.split("+"))


@dataclass(frozen=True)
class SweepPoint:
    """One evaluation of the sweep: a config with the grid values ``values`` applied."""

    config: str  # the config file as given
    stem: str
    label: str  # the method's name in tables and plots
    values: tuple[tuple[str, Any], ...]
    cfg: ExperimentConfig

    @property
    def folder(self) -> str:
        name = ",".join(f"{k}={_text(v)}" for k, v in self.values) or "base"
        return f"{self.stem}/{name.replace('/', '_')}"


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def scalar(raw: str) -> Any:
    """A value typed on the command line (``--grid``, ``--set``) as a TOML scalar (``0.3``, ``true``,
    ``"x"``); a bare word stays a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_grid(items: list[str]) -> list[Axis]:
    """``["purifier.diffpure.t_star=50,100", "ssni-n:attacks.0.eps+attacks.0.step_size=0.1+0.02,0.3+0.05"]``
    -> axes (``STEM:`` limits an axis to configs; ``k1+k2=a1+a2,b1+b2`` moves two keys together)."""
    axes = []
    for item in items:
        head, sep, raw = item.partition("=")
        scope, _, key = head.rpartition(":")
        width = len(key.split("+"))
        values = tuple(dict.fromkeys(tuple(scalar(x.strip()) for x in v.split("+"))
                                     for v in raw.split(",") if v.strip()))
        if not sep or not all("." in k for k in key.split("+")) or not values or {len(v) for v in values} != {width}:
            raise ConfigError(f"--grid {item!r}: write [STEM:]section.key=v1,v2,... (e.g. "
                              "purifier.diffpure.t_star=100,200,300), or key1+key2=a1+a2,b1+b2 for keys that move "
                              "together")
        axis = Axis(key, values, tuple(s for s in scope.split(",") if s) or None)
        if any((a.key, a.scope) == (axis.key, axis.scope) for a in axes):
            raise ConfigError(f"--grid {key} is given twice for the same configs; list all its values in one --grid")
        axes.append(axis)
    return axes


def applies(cfg: ExperimentConfig, key: str) -> bool:
    """Does the resolved config hold ``key`` (see the module docstring for the rules)?"""
    section, *path = key.split(".")
    if section == "ssni" and path != ["reweight"] and "none" in (cfg.ssni.reweight, cfg.purifier.method):
        return False
    data = cfg.to_dict()
    node: Any = data.get(section)
    if section == "purifier" and len(path) == 1 and path[0] not in node:
        path = [cfg.purifier.method, path[0]]  # a flat key of the method's table
    for part in path:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def _flat(cfg: ExperimentConfig, key: str) -> str:
    """``purifier.<method>.key`` as the flat override ``purifier.key``, which replaces the value where the
    file gives it (flat or in the method's table; the table form would clash with a flat one)."""
    parts = key.split(".")
    return f"purifier.{parts[2]}" if len(parts) == 3 and parts[:2] == ["purifier", cfg.purifier.method] else key


def _canonical(cfg: ExperimentConfig, key: str) -> str:
    """A flat method key ``purifier.key`` as ``purifier.<method>.key`` (one name per value)."""
    parts = key.split(".")
    own = vars(cfg.purifier.settings) if cfg.purifier.settings is not None else {}
    return f"purifier.{cfg.purifier.method}.{parts[1]}" if len(parts) == 2 and parts[0] == "purifier" \
        and parts[1] in own else key


def method_label(cfg: ExperimentConfig) -> str:
    """``"DiffPure + SSNI-N"``: the purifier's name, and SSNI's variant when it is on."""
    name = PURIFIER_NAMES.get(cfg.purifier.method, cfg.purifier.method)
    reweight = cfg.ssni.reweight
    return name if reweight == "none" else f"{name} + {REWEIGHT_NAMES.get(reweight, reweight)}"


def _axes_for(stem: str, cfg: ExperimentConfig, axes: list[Axis]) -> list[Axis]:
    """The axes that reach one config: scoped ones naming its stem replace unscoped ones of their key."""
    scoped = {_canonical(cfg, k) for a in axes if a.scope and stem in a.scope for k in a.keys}
    chosen = [a for a in axes if (a.scope is None and not {_canonical(cfg, k) for k in a.keys} & scoped)
              or (a.scope and stem in a.scope)]
    reach = []
    for a in chosen:
        has = [applies(cfg, k) for k in a.keys]
        if (a.scope and not all(has)) or (any(has) and not all(has)):
            missing = [k for k, h in zip(a.keys, has) if not h]
            raise ConfigError(f"--grid {a.key}: {stem} has no {', '.join(missing)} (method {cfg.purifier.method}, "
                              f"ssni.reweight {cfg.ssni.reweight})")
        if all(has):
            reach.append(a)
    return reach


def sweep_points(configs: list[Path], axes: list[Axis], overrides: dict | None = None,
                 labels: list[str] | None = None) -> list[SweepPoint]:
    """Every point of the sweep, config by config, the axes crossed in the order given; checked for
    unknown scopes, axes that reach no config and duplicate points."""
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) < len(stems):
        raise ConfigError(f"two --config files share a name ({stems}); folders and scopes use the file name: "
                          "rename one")
    if labels and len(labels) != len(configs):
        raise ConfigError(f"--label given {len(labels)} times for {len(configs)} --config files; give one per config")
    unknown = sorted({s for a in axes for s in a.scope or ()} - set(stems))
    if unknown:
        raise ConfigError(f"--grid scope(s) {unknown} name no --config file; the names are {stems}")
    points, reached = [], set()
    for k, (path, stem) in enumerate(zip(configs, stems)):
        base = load_config(Path(path), overrides)
        mine = _axes_for(stem, base, axes)
        reached |= {a.key for a in mine}
        for combo in itertools.product(*(a.values for a in mine)):
            values = tuple((k, v) for a, vs in zip(mine, combo) for k, v in zip(a.keys, vs))
            cfg = load_config(Path(path), {**(overrides or {}), **{_flat(base, k): v for k, v in values}})
            label = labels[k] if labels else method_label(cfg)
            points.append(SweepPoint(str(path), stem, label, values, cfg))
    missing = sorted({a.key for a in axes} - reached)
    if missing:
        raise ConfigError(f"--grid key(s) {missing} apply to none of the configs (a typo, or a key of another "
                          "method or attack)")
    check_duplicates(points)
    return _distinct_labels(points) if not labels else points


def _distinct_labels(points: list[SweepPoint]) -> list[SweepPoint]:
    """Default labels that two configs share get the config's stem added, so their curves stay apart."""
    stems: dict[str, set] = {}
    for p in points:
        stems.setdefault(p.label, set()).add(p.stem)
    return [SweepPoint(p.config, p.stem, f"{p.label} ({p.stem})" if len(stems[p.label]) > 1 else p.label,
                       p.values, p.cfg) for p in points]


def check_duplicates(points: list[SweepPoint]) -> None:
    """Refuse points whose configs hash alike: they would compute the same per-sample rows."""
    seen: dict[str, SweepPoint] = {}
    for p in points:
        other = seen.setdefault(p.cfg.hash(), p)
        if other is not p:
            speed = [f"{s}.{k}" for s, keys in SPEED_ONLY.items() for k in keys]
            raise ConfigError(f"sweep points {other.folder} and {p.folder} have the same config hash "
                              f"{p.cfg.hash()}: they differ only in speed-only keys ({', '.join(speed)}) or not at "
                              "all; drop one value")


def _rows(folder: Path, cfg: ExperimentConfig) -> list[dict]:
    if not (folder / RESULTS_FILE).is_file():
        return []
    return stored_rows(folder / RESULTS_FILE, cfg)


def point_level(cfg: ExperimentConfig) -> Any:
    """The purifier's constant level ``t_star`` (SSNI's largest level), ``None`` for methods without one."""
    return getattr(cfg.purifier.settings, "t_star", None)


def point_record(p: SweepPoint, rows: list[dict]) -> dict:
    """What ``sweep.json`` keeps of a point: counts, accuracies with intervals under every protocol, levels."""
    head = {"config": p.config, "stem": p.stem, "label": p.label, "values": dict(p.values), "folder": p.folder,
            "hash": p.cfg.hash(), "method": p.cfg.purifier.method, "reweight": p.cfg.ssni.reweight,
            "level": point_level(p.cfg), "eps": p.cfg.attacks[0].eps,
            "n": len(rows), "n_planned": p.cfg.data.n, "complete": len(rows) >= p.cfg.data.n}
    if not rows:
        return head
    s = summarize(rows, p.cfg)
    keep = ("acc", "correct", "n", "ci95")
    return {**head, "draws": s["draws"], "clean": {k: s["clean"][k] for k in keep},
            "robust": {q: {k: acc[k] for k in keep} for q, acc in s["robust_by_protocol"].items()},
            "t_mean": s["t_mean"], "t_std": s["t_std"], "t_adv_mean": s["after_each_attack"][0]["t_adv_mean"]}


def collect(points: list[SweepPoint], out: Path, protocol: str = "worst") -> dict:
    """``sweep.json``'s content from whatever the points' stores hold now."""
    return {"protocol": protocol, "grid_keys": list(dict.fromkeys(k for p in points for k, _ in p.values)),
            "configs": list(dict.fromkeys(p.config for p in points)),
            "points": [point_record(p, _rows(out / p.folder, p.cfg)) for p in points]}


def write_outputs(result: dict, out: Path, points: list[SweepPoint], plots: bool = True) -> None:
    """``sweep.json``, ``table.md``, and with ``plots`` the figures and the paired verdicts."""
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.md").write_text(format_table(result) + "\n")
    if not plots or not any(p["n"] for p in result["points"]):
        return
    from .frontier import plot_frontier, plot_robust_vs_eps

    plot_frontier(result, out / "frontier.png")
    if len({p["eps"] for p in result["points"]}) > 1:
        plot_robust_vs_eps(result, out / "robust_vs_eps.png")
    write_paired(result, out, points)


def write_paired(result: dict, out: Path, points: list[SweepPoint]) -> list[dict] | None:
    """``paired.json`` and ``paired.md`` (:func:`ssni.frontier.paired_verdicts`) when the sweep has both
    SSNI points and constant-level points; ``None`` otherwise."""
    from .frontier import format_paired, paired_verdicts, verdicts_of

    kinds = {p["reweight"] == "none" for p in result["points"] if p["n"]}
    if kinds != {True, False}:
        return None
    verdicts = {p.folder: verdicts_of(_rows(out / p.folder, p.cfg),
                                      [f"{k}:{a.name}" for k, a in enumerate(p.cfg.attacks)], result["protocol"])
                for p in points}
    entries = paired_verdicts(result, verdicts)
    (out / "paired.json").write_text(json.dumps(entries, indent=2) + "\n")
    (out / "paired.md").write_text(format_paired(entries) + "\n")
    return entries


def run_sweep(points: list[SweepPoint], out: Path, weights_dir: Path | None = None, progress: bool = True,
              protocol: str = "worst", run: bool = True) -> dict:
    """Run (or resume) every point into ``out``, then write the outputs. After each point
    ``sweep.json`` and ``table.md`` are rewritten, so a long sweep can be read while it runs.
    ``run=False`` only collects what the stores hold. ``out`` is claimed as a sweep folder first
    (:func:`ssni.folders.claim`: a file or another command's folder is refused)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: choose one of {list(PROTOCOLS)}")
    out = claim(out, "sweep")  # its points are evaluate folders inside it
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for i, p in enumerate(points if run else []):
        folder = out / p.folder
        if len(_rows(folder, p.cfg)) < p.cfg.data.n:
            start = time.time()
            evaluate(p.cfg, folder, weights_dir, progress=progress)
            times[p.folder] = {"wall_seconds_last_call": round(time.time() - start, 1)}
        times.setdefault(p.folder, {})["sample_seconds"] = round(sum(r["seconds"] for r in _rows(folder, p.cfg)), 1)
        times_path.write_text(json.dumps(times, indent=2) + "\n")
        if i + 1 < len(points):
            write_outputs(collect(points, out, protocol), out, points, plots=False)
    result = collect(points, out, protocol)
    write_outputs(result, out, points)
    return result


def format_table(result: dict) -> str:
    """A markdown table of every point: clean and robust accuracy under every protocol, 95% intervals."""
    draws = next((p["draws"] for p in result["points"] if "draws" in p), "N")
    head = ("| method | " + " | ".join(result["grid_keys"]) + " | n | clean | worst of " + f"{draws} | majority of "
            f"{draws} | single draw | any iterate | t* mean (std) | t* adv |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in result["points"]:
        values = " | ".join(_text(p["values"].get(k, "-")) for k in result["grid_keys"])
        if not p["n"]:
            lines.append(f"| {p['label']} | {values} | 0 of {p['n_planned']} | not run yet |" + " |" * 6)
            continue
        n = f"{p['n']}" + ("" if p["complete"] else f" of {p['n_planned']}")
        robust = " | ".join(pct(p["robust"][q]) for q in ("worst", "majority", "single", "any_iterate"))
        t_adv = "-" if p["t_adv_mean"] is None else f"{p['t_adv_mean']:.0f}"
        lines.append(f"| {p['label']} | {values} | {n} | {pct(p['clean'])} | {robust} | "
                     f"{p['t_mean']:.0f} ({p['t_std']:.0f}) | {t_adv} |")
    return "\n".join(lines)


def plan_sweep(points: list[SweepPoint], out: Path | None = None, weights_dir: Path | None = None) -> dict:
    """``--plan``: :func:`ssni.evaluate.plan.plan_run` for every point, and their sum; with ``out``, the
    samples each point's store already holds and the time left."""
    from .evaluate.plan import plan_run

    rows = []
    for p in points:
        plan = plan_run(p.cfg, weights_dir)
        done = len(_rows(Path(out) / p.folder, p.cfg)) if out is not None else 0
        seconds = plan.get("seconds", 0.0)
        rows.append({"folder": p.folder, "label": p.label, "n": p.cfg.data.n, "done": done, "seconds": seconds,
                     "left_seconds": seconds * max(p.cfg.data.n - done, 0) / p.cfg.data.n,
                     "peak_bytes": plan.get("peak_bytes", 0), "device": plan.get("device", p.cfg.evaluate.device)})
    return {"points": rows, "seconds": sum(r["seconds"] for r in rows),
            "left_seconds": sum(r["left_seconds"] for r in rows),
            "peak_bytes": max((r["peak_bytes"] for r in rows), default=0)}


def format_sweep_plan(plan: dict) -> str:
    lines = [f"plan: {len(plan['points'])} point(s), run one after another"]
    lines += [f"  {r['folder']:<60} {r['seconds']:9.1f} s  ({r['done']} of {r['n']} samples done)"
              for r in plan["points"]]
    lines += [f"  predicted wall time   {plan['seconds']:9.1f} s  ({plan['seconds'] / 3600:.2f} h; "
              f"left: {plan['left_seconds'] / 3600:.2f} h)",
              f"  largest predicted peak memory {plan['peak_bytes'] / 2 ** 30:.2f} GiB (one point at a time)"]
    return "\n".join(lines)
