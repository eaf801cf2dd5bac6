"""What the ``ssni`` commands share: the device line, ``--set`` overrides, configs with notes, output folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from .evaluate.config import ExperimentConfig

DEVICE_OPTION_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"


def announce_device(name: str, precision: str = "fp32") -> None:
    """Check the device against this machine and say which one the command uses, as its first line
    (on rank 0 under torchrun)."""
    import os

    from .runtime import describe_device, resolve_device

    device = resolve_device(name)
    if int(os.environ.get("RANK", 0)) == 0:
        typer.echo(describe_device(device, precision))


def parse_overrides(items: list[str]) -> dict:
    """``section.key=value`` pairs; values parse as TOML scalars (strings may be bare)."""
    import tomllib

    from .errors import ConfigError

    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. data.n=20")
        try:
            parsed[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key] = raw
    return parsed


def load_config_noted(config: Path, overrides: dict) -> ExperimentConfig:
    """The experiment, with a ``note:`` line for what the file leaves to defaults a user may not expect."""
    from .evaluate import load_config

    notes: list[str] = []
    cfg = load_config(config, overrides, notes)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    return cfg


def claim_folder(out: Path, command: str, total: int | None = None) -> None:
    """Make ``out`` the command's folder before anything is written (refused: a file, a folder of another
    command, no write access); after Ctrl-C, say what it keeps and how to resume."""
    from .console import on_interrupt
    from .folders import claim, stored

    claim(out, command)
    on_interrupt(lambda: f"{stored(out, command, total)}; run the same command again to resume")
