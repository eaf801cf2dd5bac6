"""The ``ssni`` command line: thin commands, each one library call.

User errors (:class:`ssni.errors.SSNIError`) print one line and exit with status 2.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from .errors import SSNIError

app = typer.Typer(help="Sample-specific Score-aware Noise Injection (SSNI) for diffusion purification.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train the small models shipped in weights/ (CPU, seeded).", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _command_line() -> str:
    return "ssni " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@train_app.command("score")
def train_score(
    steps: int = typer.Option(3000, min=1, help="optimiser steps"),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(2e-3, min=0.0),
    seed: int = typer.Option(0),
    base_channels: int = typer.Option(16, min=8),
    mults: str = typer.Option("1,2,4", help="channel multipliers per resolution"),
    dataset: str = typer.Option("mnist-5k"),
    weights_dir: Path = typer.Option(Path("weights"), help="where the weights and manifest go"),
    name: str = typer.Option("mnist-unet", help="manifest name"),
) -> None:
    """Train the epsilon-prediction UNet (DDPM loss). Example: ssni train score --steps 3000"""
    from .denoisers.unet import UNetConfig
    from .train import TrainConfig, train_and_register

    arch = UNetConfig(base_channels=base_channels, channel_mults=tuple(int(m) for m in mults.split(",")))
    cfg = TrainConfig(dataset=dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema=0.999)
    entry = train_and_register("score", cfg, arch, weights_dir, name, _command_line())
    typer.echo(f"{name}: {entry['metrics']} in {entry['train_seconds']} s -> {weights_dir / entry['file']}")


@train_app.command("classifier")
def train_classifier(
    steps: int = typer.Option(1500, min=1, help="optimiser steps"),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(2e-3, min=0.0),
    seed: int = typer.Option(0),
    width: int = typer.Option(32, min=4),
    dataset: str = typer.Option("mnist-5k"),
    weights_dir: Path = typer.Option(Path("weights")),
    name: str = typer.Option("mnist-cnn"),
) -> None:
    """Train the small CNN classifier. Example: ssni train classifier --steps 1500"""
    from .classifiers.small_cnn import SmallCNNConfig
    from .train import TrainConfig, train_and_register

    cfg = TrainConfig(dataset=dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema=0.99)
    entry = train_and_register("classifier", cfg, SmallCNNConfig(width=width), weights_dir, name, _command_line())
    typer.echo(f"{name}: {entry['metrics']} in {entry['train_seconds']} s -> {weights_dir / entry['file']}")


def main() -> None:
    try:
        app()
    except SSNIError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
