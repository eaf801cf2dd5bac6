"""``ssni converge`` and ``ssni sweep``: studies made of many evaluations (budget ladders, grids of settings)."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import (
    DEVICE_OPTION_HELP,
    announce_device,
    announce_devices,
    claim_folder,
    command_overrides,
    load_config_noted,
)


def converge(
    config: Path = typer.Option(..., "--config", help="experiment TOML; its first attack is the base budget"),
    out: Path = typer.Option(..., "--out", help="output folder: one sub-folder per budget point (rerun to resume), "
                             "convergence.json, convergence.png"),
    ladder: str = typer.Option(None, help="rungs per axis, e.g. 'steps=10,20,50 eot=1,2,4'; each axis varies alone "
                               "at the configured base of the others (default: DEFAULT_LADDER of "
                               "ssni.evaluate.convergence: steps, eot and restarts)"),
    restarts: str = typer.Option(None, help="restart rungs (apgd), e.g. 1,2,4 (same as restarts=... in --ladder)"),
    attack: list[str] = typer.Option([], "--attack", help="attack name(s) to study (default: the configured one)"),
    limit: int = typer.Option(None, min=1, help="validation images (overrides data.n)"),
    set_: list[str] = typer.Option([], "--set", help="override a config value: --set ssni.reweight=none"),
    label: str = typer.Option(None, help="name of the defense in the plot legend"),
    weights_dir: Path = typer.Option(None, help="folder with manifest.json (default: the shipped weights/)"),
    progress: bool = typer.Option(True, help="progress bars"),
    device: str = typer.Option(None, help=DEVICE_OPTION_HELP + " (overrides evaluate.device)"),
) -> None:
    """Robust accuracy (worst of N) along a budget ladder on the validation split; choose the budget.

    Example: ssni converge --config configs/mnist-diffpure-ssni-n.toml --out runs/conv
    --ladder "steps=5,10,20,40 eot=1,2,4,8" --attack pgd --attack apgd --limit 40
    """
    from .errors import ConfigError
    from .evaluate.convergence import DEFAULT_LADDER, parse_ladder, run_convergence
    from .evaluate.registries import ATTACKS

    overrides = command_overrides(set_, limit, device, [config])
    rungs = {**(DEFAULT_LADDER if ladder is None else parse_ladder(ladder)),
             **(parse_ladder(f"restarts={restarts}") if restarts else {})}
    if not rungs:
        raise ConfigError("--ladder is empty; give the rungs to run, e.g. --ladder 'steps=10,20,50 eot=1,2,4'")
    unknown = [a for a in attack if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack(s) {unknown} for --attack; choose from {sorted(ATTACKS)}")
    cfg = load_config_noted(config, overrides)
    announce_device(cfg.evaluate.device, cfg.evaluate.precision)
    claim_folder(out, "converge")
    result = run_convergence(cfg, out, list(attack) or None, rungs, weights_dir,
                             progress, label)
    for name, choice in result["choice"].items():
        typer.echo(f"{name}: {choice['verdict']}")
        for axis, detail in choice["axes"].items():
            typer.echo("\n".join(f"  {axis}: {line}" for line in detail["reasoning"]))
    typer.echo(f"wrote {out / 'convergence.json'} and {out / 'convergence.png'}")


def sweep(
    config: list[Path] = typer.Option(..., "--config", help="experiment TOML; repeat for several methods in one "
                                      "sweep (e.g. DiffPure, SSNI-N, SSNI-L)"),
    grid: list[str] = typer.Option([], "--grid", help="an axis: section.key=v1,v2,... (e.g. "
                                   "purifier.diffpure.t_star=50,100,300 or attacks.0.eps=0.1,0.3); axes are crossed. "
                                   "An axis reaches only the configs that have its key (a purifier table: that "
                                   "method; attacks.K.key: a K-th attack that reads key; ssni.*: SSNI on); a config "
                                   "runs once per combination of the axes it has, once if none. STEM:key=... "
                                   "(STEM1,STEM2:...) limits an axis to those config file stems and replaces an "
                                   "unscoped axis of that key for them. A key no config has is an error"),
    out: Path = typer.Option(..., "--out", help="output folder: OUT/<stem>/<key=value,...>/ per point (rerun to "
                             "resume), sweep.json, table.md, frontier.png, robust_vs_eps.png, paired.md"),
    label: list[str] = typer.Option([], "--label", help="method name per --config, in order (default: the "
                                    "purifier and SSNI variant, e.g. 'DiffPure + SSNI-N')"),
    set_: list[str] = typer.Option([], "--set", help="override a value in every config: --set data.split=val"),
    limit: int = typer.Option(None, min=1, help="evaluate only the first N samples of every point (data.n)"),
    protocol: str = typer.Option("worst", help="robust axis of the plots and the paired verdicts: worst, "
                                 "majority, single or any_iterate (the table shows all)"),
    plan: bool = typer.Option(False, "--plan", help="predict every point's wall time (ssni evaluate --plan), print "
                              "the sum and the time left, and exit"),
    collect: bool = typer.Option(False, "--collect", help="run nothing: write the outputs from what the points' "
                                 "stores hold now (e.g. while a sweep runs elsewhere)"),
    weights_dir: Path = typer.Option(None, help="folder with manifest.json (default: the shipped weights/)"),
    progress: bool = typer.Option(True, help="progress bars"),
    device: str = typer.Option(None, help=DEVICE_OPTION_HELP + " (overrides evaluate.device in every config)"),
) -> None:
    """Evaluate a grid of configs, one resumable store per point; table, frontier plot, paired verdicts.

    Points that differ only in speed-only keys (evaluate.batch_size, device, ...) are refused as duplicates.
    Example: ssni sweep --config configs/a.toml --config configs/b.toml
    --grid purifier.diffpure.t_star=100,200,300 --grid attacks.0.eps=0.1,0.3 --out runs/sweep
    """
    from .sweep import format_sweep_plan, format_table, parse_grid, plan_sweep, run_sweep, sweep_points

    overrides = command_overrides(set_, limit, device, config)
    points = sweep_points(list(config), parse_grid(grid), overrides, list(label) or None)
    announce_devices(((p.cfg.evaluate.device, p.cfg.evaluate.precision) for p in points), "points")
    if plan:
        typer.echo(format_sweep_plan(plan_sweep(points, out, weights_dir)))
        return
    claim_folder(out, "sweep")
    result = run_sweep(points, out, weights_dir, progress, protocol, run=not collect)
    typer.echo(format_table(result))
    typer.echo(f"wrote {out / 'sweep.json'}, table.md, times.json, frontier.png"
               + (", robust_vs_eps.png" if len({p['eps'] for p in result['points']}) > 1 else "")
               + (", paired.md" if (out / "paired.md").is_file() else ""))
