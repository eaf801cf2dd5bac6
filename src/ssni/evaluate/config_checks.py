"""Type and range checks of every config value, before anything loads.

A wrong value fails with one :class:`ConfigError` that names the key, the value
found and what is allowed, e.g. ``[data] n = -5: expected an integer >= 1``. The
types come from the config dataclasses' annotations; the ranges (inclusive bounds,
``None`` for unbounded) live in :data:`RANGES` for the shared sections and in the field
metadata ``range`` of each purifier's settings dataclass, so a new purifier brings its own.
"""

from __future__ import annotations

import math
import typing
from dataclasses import fields
from typing import Any

from ..errors import ConfigError
from .registries import ATTACKS, PURIFIERS

RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("data", "n"): (1, None), ("data", "subset_seed"): (0, 2**32 - 1),
    ("purifier", "steps"): (0, 1000), ("purifier", "eta"): (0, 1),
    ("purifier", "votes"): (1, None), ("purifier", "resolution"): (8, 4096),
    ("ssni", "n_levels"): (1, 1000), ("ssni", "bias"): (0, 1000), ("ssni", "tau"): (1e-12, None),
    ("ssni", "calibration_size"): (1, None), ("ssni", "calibration_seed"): (0, None),
    ("attacks", "eps"): (0, None), ("attacks", "steps"): (0, None), ("attacks", "step_size"): (1e-12, None),
    ("attacks", "eot"): (1, None), ("attacks", "eot_batch"): (1, None), ("attacks", "surrogate_steps"): (1, 1000),
    ("attacks", "restarts"): (1, None), ("evaluate", "batch_size"): (1, None), ("evaluate", "rescore_draws"): (1, None),
    ("evaluate", "max_rows"): (1, None),
    ("evaluate", "seed"): (0, None),
}
# keys that also take "auto": the fastest value that fits, measured on the device (ssni.evaluate.auto)
AUTO = {("evaluate", "batch_size"), ("attacks", "eot_batch"), ("purifier", "checkpoint")}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_section(cls: type, section: str, values: dict[str, Any]) -> None:
    """Raise a :class:`ConfigError` for the first value of ``[section]`` of the wrong type or range."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if (section, f.name) in AUTO and values.get(f.name) == "auto":
            continue
        if f.name in values:
            bounds = f.metadata.get("range", RANGES.get((section, f.name), (None, None)))
            where = f"[{section}] {f.name} = {values[f.name]!r}"
            if (section, f.name) not in AUTO:
                _check_value(where, values[f.name], hints[f.name], bounds)
                continue
            try:
                _check_value(where, values[f.name], _without_str(hints[f.name]), bounds)
            except ConfigError as err:
                raise ConfigError(f'{err} or "auto"') from None


def _without_str(hint: Any) -> Any:
    """``int | str`` -> ``int``: the type of an AUTO key's value other than ``"auto"``."""
    return next(a for a in typing.get_args(hint) if a is not str)


def check_cross(attacks: list[dict[str, Any]]) -> None:
    """Constraints between keys: an l_inf radius above 1 covers the whole [0, 1] box."""
    for k, a in enumerate(attacks):
        if a.get("norm", "linf") == "linf" and isinstance(a.get("eps"), (int, float)) and a["eps"] > 1:
            raise ConfigError(f"[[attacks]] #{k} eps = {a['eps']!r}: an l_inf radius must lie in [0, 1] "
                              "(pixels are in [0, 1]); did you mean 8/255 = 0.0314?")


def _check_value(where: str, value: Any, hint: Any, bounds: tuple) -> None:
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return
        raise ConfigError(f"{where}: a value is required")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is tuple:
        if not isinstance(value, (list, tuple)) or not value or not all(_is(v, int) for v in value):
            raise ConfigError(f"{where}: expected a non-empty list of integers")
        for v in value:
            _check_range(where, bounds, v, "integers")
        return
    if not _is(value, base):
        raise ConfigError(f"{where}: expected {_TYPE_NAMES.get(base, base)}"
                          f"{' or nothing' if optional else ''}{_range_text(bounds)}")
    _check_range(where, bounds, value, _TYPE_NAMES.get(base, "a value"))


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_range(where: str, bounds: tuple, value: Any, kind: str) -> None:
    low, high = bounds
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{where}: expected {kind}{_range_text(bounds)}")


def _range_text(bounds: tuple) -> str:
    low, high = bounds
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def check_attack(k: int, attack: dict[str, Any]) -> None:
    """An ``[[attacks]]`` key given for an attack that does not read it (``ATTACKS[name].reads``), or
    a gradient mode it does not take. Runs after the entry's names and types are checked."""
    name = attack.get("name", "pgd")
    reads = ATTACKS[name].reads
    unused = sorted(set(attack) - reads)
    if unused:
        users = {key: ", ".join(sorted(n for n, e in ATTACKS.items() if key in e.reads)) for key in unused}
        raise ConfigError(f"[[attacks]] #{k} name = {name!r} does not use "
                          + "; ".join(f"{key} (read by {users[key]})" for key in unused)
                          + f"; remove {'them' if len(unused) > 1 else 'it'}. {name} reads {sorted(reads)}")
    check_gradient(name, attack.get("gradient", "exact"))


def check_gradient(name: str, gradient: str) -> None:
    """The gradient modes an attack takes are its registry entry's ``gradients``."""
    if gradient not in ATTACKS[name].gradients:
        raise ConfigError(f"attack {name!r} cannot take gradient = {gradient!r}; it takes "
                          f"{' | '.join(ATTACKS[name].gradients)} ("
                          + ", ".join(f"{n}: {' | '.join(e.gradients)}" for n, e in ATTACKS.items()) + ")")


def misplaced_purifier_key(key: str, method: str, where: str) -> ConfigError | None:
    """The error for a key of another purifier's settings table given for ``method``, else ``None``."""
    owners = [name for name, entry in PURIFIERS.items() if key in {f.name for f in fields(entry.settings)}]
    if not owners or method in owners:
        return None
    tables = " or ".join(f"[purifier.{name}]" for name in owners)
    with_method = f"method = {owners[0]!r}" if len(owners) == 1 else "that method"
    return ConfigError(f"{where} {key} does not apply to method = {method!r}: it is a setting of "
                       f"{', '.join(owners)} and belongs in {tables} with {with_method}")
