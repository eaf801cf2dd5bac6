"""What the ``ssni`` commands share: the device line, ``--set`` overrides, configs with notes, output folders."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from .evaluate.config import ExperimentConfig

DEVICE_OPTION_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"


def announce_device(name: str, precision: str = "fp32") -> None:
    """Check the device against this machine and say which one the command uses, as its first line
    (on rank 0 under torchrun)."""
    announce_devices([(name, precision)])


def announce_devices(settings: Iterable[tuple[str, str]], unit: str = "runs") -> None:
    """:func:`announce_device` for runs of several configs: one line per distinct (device, precision)
    they use, with how many of the runs use it when they differ."""
    import os
    from collections import Counter

    from .runtime import describe_device, resolve_device

    used = Counter((resolve_device(name), precision) for name, precision in settings)
    if int(os.environ.get("RANK", 0)) == 0:
        for (device, precision), count in used.items():
            share = f" ({count} of {used.total()} {unit})" if len(used) > 1 else ""
            typer.echo(describe_device(device, precision) + share)


def parse_overrides(items: list[str]) -> dict:
    """``section.key=value`` pairs; values parse as TOML scalars (strings may be bare)."""
    from .errors import ConfigError
    from .sweep import scalar

    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. data.n=20")
        parsed[key] = scalar(raw)
    return parsed


def command_overrides(set_: list[str], limit: int | None = None, device: str | None = None,
                      configs: Iterable[Path] = ()) -> dict:
    """The ``--set`` pairs with ``--limit`` (``data.n``) and ``--device`` (``evaluate.device``) applied
    over them. A ``--set`` value that a flag replaces is still checked against each of ``configs``, as
    the file's own value is."""
    from .evaluate import load_config

    overrides = parse_overrides(set_)
    flags = {key: value for key, value in (("data.n", limit), ("evaluate.device", device)) if value is not None}
    if flags.keys() & overrides.keys():
        for config in configs:
            load_config(config, overrides)
    return {**overrides, **flags}


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
    from .folders import claim

    claim(out, command)
    resume_note(out, command, total)


def resume_note(out: Path, command: str, total: int | None = None) -> None:
    """After Ctrl-C, say what ``out`` keeps (of ``total``) and how to resume."""
    from .console import on_interrupt
    from .folders import stored

    on_interrupt(lambda: f"{stored(out, command, total)}; run the same command again to resume")
