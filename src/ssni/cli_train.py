"""``ssni train``: the small models shipped in ``weights/``, trained on the CPU, seeded."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

DATASET_HELP = "training images: mnist-5k (embedded) or fashion-mnist (Debian package); trained on its train part"
train_app = typer.Typer(help="Train the small models shipped in weights/ (CPU, seeded).", no_args_is_help=True,
                        rich_markup_mode=None)


def command_line() -> str:
    """The command as typed (recorded in the manifest, so the file can be made again)."""
    return "ssni " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _before_training(weights_dir: Path) -> None:
    """Check that the weights can be written there (before training, not after), and say on Ctrl-C
    that nothing was saved."""
    from .console import on_interrupt
    from .folders import check_folder

    check_folder(weights_dir, "--weights-dir")
    on_interrupt(lambda: "nothing was saved (training writes its weights when it ends); run the command again "
                         "to start over")


@train_app.command("score")
def train_score(
    steps: int = typer.Option(3000, min=1, help="optimiser steps"),
    batch_size: int = typer.Option(128, min=1, help="training images per optimiser step"),
    lr: float = typer.Option(2e-3, min=0.0, help="peak learning rate of Adam (one-cycle schedule: 5% warm-up, "
                             "then cosine decay)"),
    seed: int = typer.Option(0, help="seeds the initial weights, data order, augmentation and diffusion noise "
                             "(the same seed and torch build give the same file)"),
    base_channels: int = typer.Option(16, min=8, help="channels of the UNet's first resolution (the others are "
                                      "multiples: --mults)"),
    mults: str = typer.Option("1,2,4", help="channel multipliers per resolution"),
    dataset: str = typer.Option("mnist-5k", help=DATASET_HELP),
    weights_dir: Path = typer.Option(Path("trained"), help="where the weights and manifest go"),
    name: str = typer.Option("mnist-unet", help="manifest name"),
    force: bool = typer.Option(False, "--force", help="replace an existing model of that name"),
) -> None:
    """Train the epsilon-prediction UNet (DDPM loss). Example: ssni train score --steps 3000"""
    from .denoisers.unet import UNetConfig
    from .train import TrainConfig, train_and_register

    arch = UNetConfig(base_channels=base_channels, channel_mults=tuple(int(m) for m in mults.split(",")))
    cfg = TrainConfig(dataset=dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema=0.999)
    _before_training(weights_dir)
    entry = train_and_register("score", cfg, arch, weights_dir, name, command_line(), force=force)
    typer.echo(f"{name}: {entry['metrics']} in {entry['train_seconds']} s -> {weights_dir / entry['file']}")


@train_app.command("classifier")
def train_classifier(
    steps: int = typer.Option(1500, min=1, help="optimiser steps"),
    batch_size: int = typer.Option(128, min=1, help="training images per optimiser step"),
    lr: float = typer.Option(2e-3, min=0.0, help="peak learning rate of Adam (one-cycle schedule: 5% warm-up, "
                             "then cosine decay)"),
    seed: int = typer.Option(0, help="seeds the initial weights, data order and augmentation (the same seed "
                             "and torch build give the same file)"),
    width: int = typer.Option(32, min=4, help="channels of the CNN's first conv stage (the second has twice as many)"),
    dataset: str = typer.Option("mnist-5k", help=DATASET_HELP),
    weights_dir: Path = typer.Option(Path("trained"), help="where the weights and manifest go"),
    name: str = typer.Option("mnist-cnn", help="manifest name"),
    force: bool = typer.Option(False, "--force", help="replace an existing model of that name"),
) -> None:
    """Train the small CNN classifier. Example: ssni train classifier --steps 1500"""
    from .classifiers.small_cnn import SmallCNNConfig
    from .train import TrainConfig, train_and_register

    cfg = TrainConfig(dataset=dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, ema=0.99)
    _before_training(weights_dir)
    entry = train_and_register("classifier", cfg, SmallCNNConfig(width=width), weights_dir, name, command_line(),
                               force=force)
    typer.echo(f"{name}: {entry['metrics']} in {entry['train_seconds']} s -> {weights_dir / entry['file']}")


__all__ = ["command_line", "train_app"]
