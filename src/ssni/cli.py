"""The ``ssni`` command line: thin commands, each one library call.

User errors (:class:`ssni.errors.SSNIError`) print one line and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .cli_common import (DEVICE_OPTION_HELP, announce_device, claim_folder, command_overrides, load_config_noted,
                         resume_note)
from .cli_studies import converge, sweep
from .cli_train import train_app

if TYPE_CHECKING:
    from .evaluate.config import ExperimentConfig

app = typer.Typer(help="Sample-specific Score-aware Noise Injection (SSNI) for diffusion purification.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
app.add_typer(train_app, name="train")

@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="output folder (created; nothing is written elsewhere)"),
    quick: bool = typer.Option(False, "--quick", help="40 test images instead of 200 (under 5 minutes on 2 cores)"),
    all_methods: bool = typer.Option(False, "--all", help="also GDMP and GNS, with and without SSNI-N"),
    n_test: int = typer.Option(None, min=1, help="test images (default 200, quick 40)"),
    eps: float = typer.Option(None, min=0.0, max=1.0, help="l_inf budget (default 0.3)"),
    pgd_steps: int = typer.Option(None, min=0, help="PGD iterations (default 40)"),
    eot: int = typer.Option(None, min=1, help="EOT samples per PGD step (default 2)"),
    draws: int = typer.Option(None, min=1, help="fresh draws that re-score each adversarial example (default 8)"),
    t_star: int = typer.Option(None, min=1, max=1000, help="DiffPure's constant level (default 300)"),
    batch_size: int = typer.Option(None, min=1, help="images per batch (default 100; smaller lowers peak memory)"),
    dataset: str = typer.Option("mnist-5k", help="mnist-5k (embedded) or fashion-mnist (Debian package)"),
    split: str = typer.Option("test", help="test, or val to choose settings without touching the test split"),
    weights_dir: Path = typer.Option(None, help="folder with manifest.json (default: the shipped weights/)"),
    device: str = typer.Option("auto", help=DEVICE_OPTION_HELP),
) -> None:
    """Run SSNI on real MNIST with the shipped models: clean and PGD+EOT accuracy, plots.

    Example: ssni demo --quick --out out/demo
    """
    from .demo import demo_config, run_demo
    from .errors import ConfigError
    from .report import format_table

    if split not in ("test", "val"):  # train is what the models and SSNI's calibration were fit on
        why = " (train is the split the shipped models and SSNI's calibration were fit on)" if split == "train" else ""
        raise ConfigError(f"--split {split!r}: the demo evaluates test or val{why}")
    cfg = demo_config(quick, dataset=dataset, split=split, all_methods=all_methods or None, n_test=n_test, eps=eps, pgd_steps=pgd_steps,
                      eot=eot, t_star=t_star, rescore_draws=draws, batch_size=batch_size, device=device)
    announce_device(cfg.device)
    resume_note(out, "demo")
    results = run_demo(cfg, out, weights_dir)  # claims --out once the models are found
    typer.echo(format_table(results["rows"]))
    typer.echo(f"score-norm AUROC clean vs adversarial: {results['auroc_score_norm']:.3f}")
    typer.echo(f"robust columns from {cfg.rescore_draws} fresh draws per adversarial example, 95% Wilson intervals")
    typer.echo(f"wrote {out / 'results.json'}, table.txt, score_norms.png, t_star.png, purification.png, "
               "robust_vs_draws.png")


def _init_distributed() -> None:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@app.command()
def evaluate(
    config: Path = typer.Option(..., "--config", help="experiment TOML (see configs/)"),
    out: Path = typer.Option(..., "--out", help="output folder; rerun the same command to resume"),
    weights_dir: Path = typer.Option(None, help="folder with manifest.json (default: the shipped weights/)"),
    limit: int = typer.Option(None, min=1, help="evaluate only the first N samples (overrides data.n)"),
    set_: list[str] = typer.Option([], "--set", help="override a config value: --set data.n=20"),
    progress: bool = typer.Option(True, help="progress bar with ETA"),
    sanity: bool = typer.Option(False, "--sanity", help="also run gradient-masking and convergence checks on a "
                                "few samples; exit status 1 if one fails"),
    sanity_n: int = typer.Option(16, min=2, help="samples used by --sanity"),
    device: str = typer.Option(None, help=DEVICE_OPTION_HELP + " (overrides evaluate.device)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="random-init weights, 1 attack step: plumbing check"),
    plan: bool = typer.Option(False, "--plan", help="measure a few network calls, print the predicted wall time, "
                              "peak memory and largest batch / eot_batch that fit, and exit (nothing is written)"),
) -> None:
    """Run an experiment sample by sample into OUT/results.sqlite (resumable, shardable).

    Examples: ssni evaluate --config configs/mnist-diffpure-ssni-n.toml --out runs/n;
    torchrun --nproc_per_node=4 -m ssni.cli evaluate --config ... --out ...
    """
    from .evaluate import evaluate as run

    cfg = _evaluate_config(config, set_, limit, device, dry_run)
    announce_device(cfg.evaluate.device, cfg.evaluate.precision)
    if plan:
        from .evaluate.plan import format_plan, plan_run

        typer.echo(format_plan(plan_run(cfg, weights_dir)))
        return
    claim_folder(out, "evaluate", cfg.data.n)
    _init_distributed()
    run(cfg, out, weights_dir, progress=progress)
    _summarize_evaluation(out, cfg, weights_dir, sanity, sanity_n)


def _evaluate_config(config: Path, set_: list[str], limit: int | None, device: str | None,
                     dry_run: bool) -> ExperimentConfig:
    """``ssni evaluate``'s experiment: the TOML with ``--set``, ``--limit`` and ``--device`` applied
    (in that order), shrunk by ``--dry-run``."""
    from .evaluate.config import dry_run as shrink

    cfg = load_config_noted(config, command_overrides(set_, limit, device, [config]))
    if dry_run:
        cfg = shrink(cfg, n=limit or 2)
    return cfg


def _summarize_evaluation(out: Path, cfg: ExperimentConfig, weights_dir: Path | None, sanity: bool,
                          sanity_n: int) -> None:
    """Print the run's summary on rank 0 (with ``--sanity``: after the checks on ``sanity_n`` samples)."""
    import os

    from .evaluate.report import summarize_run

    if int(os.environ.get("RANK", 0)) == 0:
        typer.echo(summarize_run(out, cfg, weights_dir, sanity_n if sanity else 0))
        if sanity and not json.loads((out / "summary.json").read_text())["sanity"]["all_passed"]:
            raise typer.Exit(1)  # a failed check (masking or an unconverged attack) fails the run


app.command()(converge)
app.command()(sweep)


@app.command()
def purify(
    source: Path = typer.Argument(..., help="folder of images (PNG/JPEG/BMP/WebP, any depth)"),
    out: Path = typer.Option(..., "--out", help="output folder: purified PNGs + purify.csv; rerun to resume"),
    config: Path = typer.Option(None, "--config", help="experiment TOML naming the models, purifier and SSNI "
                                "(default: configs/mnist-diffpure-ssni-n.toml, the demo's defense)"),
    weights_dir: Path = typer.Option(None, help="folder with manifest.json or public checkpoints"),
    set_: list[str] = typer.Option([], "--set", help="override a config value: "
                                   "--set purifier.diffpure.t_star=200"),
    width: int = typer.Option(32, min=1, help="rows per network call (continuous batching)"),
    chunk: int = typer.Option(256, min=1, help="images read and score-normed at once"),
    device: str = typer.Option(None, help=DEVICE_OPTION_HELP + " (overrides evaluate.device)"),
    progress: bool = typer.Option(True, help="progress bar with ETA"),
) -> None:
    """Purify a folder of images with a defense (score norm, t*, prediction per file in purify.csv).

    Example: ssni purify my_digits/ --out purified/ (MNIST demo defense);
    ssni purify imgs/ --config configs/cifar10-wrn28-diffpure-ssni-n-linf.toml --weights-dir DIR --out p/
    """
    from .checkpoints.registry import default_weights_dir
    from .errors import ConfigError
    from .evaluate import load_config
    from .purify_folder import purify_folder, skipped_note

    default = Path(__file__).resolve().parents[2] / "configs" / "mnist-diffpure-ssni-n.toml"
    if config is None and not default.is_file():
        raise ConfigError("no --config given and the default configs/mnist-diffpure-ssni-n.toml is not here "
                          "(installed without the source tree); pass --config FILE")
    cfg = load_config(config or default, command_overrides(set_, device=device, configs=[config or default]))
    announce_device(cfg.evaluate.device, cfg.evaluate.precision)
    note = skipped_note(source)
    if note:
        typer.echo(f"note: {note}", err=True)
    resume_note(out, "purify")
    table = purify_folder(cfg, source, out, Path(weights_dir or default_weights_dir()), width, chunk, progress)
    typer.echo(f"wrote purified images and {table}")


@app.command()
def report(out: Path = typer.Argument(..., help="a folder written by ssni evaluate")) -> None:
    """Print the table of an evaluation and write OUT/summary.json. Example: ssni report runs/n"""
    from .errors import ResumeError
    from .evaluate.report import report as make_report
    from .folders import owner

    if owner(out) not in (None, "evaluate"):
        raise ResumeError(f"{out} holds the results of `ssni {owner(out)}`, not of `ssni evaluate`")

    typer.echo(make_report(out))


@app.command()
def models(weights_dir: Path = typer.Option(None, help="also list the models trained into this folder")) -> None:
    """List the shipped models and the public checkpoints (file, size, source, license). Example: ssni models"""
    from .checkpoints.models import format_models

    typer.echo(format_models(weights_dir))


@app.command()
def fetch(
    name: str = typer.Argument(..., help="a public model with a direct download (see `ssni models`), or cifar10-data"),
    weights_dir: Path = typer.Option(Path("weights-public"), help="folder the file goes to (cifar10-data: the "
                                     "cifar-10-batches-py folder is unpacked there)"),
) -> None:
    """Download a public checkpoint or the CIFAR-10 batches: progress bar, resumable, hash-checked.

    Example: ssni fetch imagenet-resnet50 --weights-dir weights-public
    """
    from .checkpoints.fetch import fetch_cifar10, fetch_public, shipped_file
    from .checkpoints.public import PUBLIC

    shipped = shipped_file(name)
    if shipped is not None and name not in PUBLIC:
        typer.echo(f"{name} is shipped with the package ({shipped}): nothing to download")
        return
    path = fetch_cifar10(weights_dir) if name == "cifar10-data" else fetch_public(name, weights_dir)
    typer.echo(f"{name} -> {path}")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="an EDM network pickle, e.g. edm-cifar10-32x32-uncond-vp.pkl"),
    target: Path = typer.Argument(None, help="output .safetensors (default: SOURCE with that suffix)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="confirm you trust SOURCE: it is a pickle (no code in it is run)"),
) -> None:
    """Turn an EDM .pkl into a safe .safetensors file (EMA weights + architecture in its metadata).

    Example: ssni convert edm-cifar10-32x32-uncond-vp.pkl --allow-pickle
    """
    from .checkpoints.edm_pickle import convert_edm_pickle
    from .errors import CheckpointError

    if not source.is_file():  # before asking for trust in it
        raise CheckpointError(f"cannot read {source}: " + ("it is a folder" if source.is_dir() else
                                                          "No such file or directory"))
    if not allow_pickle:
        raise CheckpointError(f"{source} is a pickle; pass --allow-pickle to confirm you trust it (the reader runs "
                              "none of the code inside, but a pickle is a program)")
    target = target or source.with_suffix(".safetensors")
    if target.suffix != ".safetensors":
        raise CheckpointError(f"{target}: the converted file must end in .safetensors")
    digest = convert_edm_pickle(source, target)
    typer.echo(f"wrote {target} (sha256 {digest})")


@app.command()
def bench(
    out: Path = typer.Option(None, help="where the JSON results go (default benchmarks/results/<cpu|cuda>-latest.json)"),
    full: bool = typer.Option(False, "--full", help="more repeats and attack samples"),
    compile_: bool = typer.Option(False, "--compile", help="also time torch.compile (needs a C++ compiler)"),
    device: str = typer.Option("auto", help=DEVICE_OPTION_HELP),
) -> None:
    """Measure purification and attack costs on this machine and print the table. Example: ssni bench"""
    from .bench import format_bench, run_bench
    from .folders import check_output_file
    from .runtime import resolve_device

    announce_device(device)
    run_device = resolve_device(device)
    out = out or Path(f"benchmarks/results/{run_device.type}-latest.json")
    check_output_file(out)  # before the benchmark runs, not after
    typer.echo(format_bench(run_bench(out, quick=not full, compile_=compile_, device=run_device)))
    typer.echo(f"wrote {out}")


def main() -> None:
    """The ``ssni`` entry point: one line and exit 2 for a user error, 130 and what was kept after Ctrl-C."""
    from .console import run

    run(app)


if __name__ == "__main__":
    main()
