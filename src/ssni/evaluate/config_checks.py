"""Type and range checks of every config value, before anything loads.

A wrong value fails with one :class:`ConfigError` that names the key, the value
found and what is allowed, e.g. ``[data] n = -5: expected an integer >= 1``. The
types come from the config dataclasses' annotations; the ranges live in
:data:`RANGES` (inclusive bounds, ``None`` for unbounded).
"""

from __future__ import annotations

import math
import typing
from dataclasses import fields
from typing import Any

from ..errors import ConfigError

RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("data", "n"): (1, None), ("data", "subset_seed"): (0, 2**32 - 1),
    ("purifier", "t_star"): (1, 1000), ("purifier", "steps"): (0, 1000), ("purifier", "eta"): (0, 1),
    ("purifier", "rounds"): (1, 100), ("purifier", "levels"): (1, 1000), ("purifier", "guide_scale"): (0, None),
    ("purifier", "guide_batch"): (1, None), ("purifier", "votes"): (1, None), ("purifier", "resolution"): (8, 4096),
    ("ssni", "n_levels"): (1, 1000), ("ssni", "bias"): (0, 1000), ("ssni", "tau"): (1e-12, None),
    ("ssni", "calibration_size"): (1, None), ("ssni", "calibration_seed"): (0, None),
    ("attacks", "eps"): (0, None), ("attacks", "steps"): (0, None), ("attacks", "step_size"): (1e-12, None),
    ("attacks", "eot"): (1, None), ("attacks", "eot_batch"): (1, None), ("attacks", "surrogate_steps"): (1, 1000),
    ("attacks", "restarts"): (1, None), ("evaluate", "batch_size"): (1, None), ("evaluate", "rescore_draws"): (1, None),
    ("evaluate", "seed"): (0, None),
}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_section(cls: type, section: str, values: dict[str, Any]) -> None:
    """Raise a :class:`ConfigError` for the first value of ``[section]`` of the wrong type or range."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in values:
            _check_value(section, f.name, values[f.name], hints[f.name])


def check_cross(attacks: list[dict[str, Any]]) -> None:
    """Constraints between keys: an l_inf radius above 1 covers the whole [0, 1] box."""
    for k, a in enumerate(attacks):
        if a.get("norm", "linf") == "linf" and isinstance(a.get("eps"), (int, float)) and a["eps"] > 1:
            raise ConfigError(f"[[attacks]] #{k} eps = {a['eps']!r}: an l_inf radius must lie in [0, 1] "
                              "(pixels are in [0, 1]); did you mean 8/255 = 0.0314?")


def _check_value(section: str, key: str, value: Any, hint: Any) -> None:
    where = f"[{section}] {key} = {value!r}"
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
            _check_range(where, section, key, v, "integers")
        return
    if not _is(value, base):
        raise ConfigError(f"{where}: expected {_TYPE_NAMES.get(base, base)}"
                          f"{' or nothing' if optional else ''}{_range_text(section, key)}")
    _check_range(where, section, key, value, _TYPE_NAMES.get(base, "a value"))


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_range(where: str, section: str, key: str, value: Any, kind: str) -> None:
    low, high = RANGES.get((section, key), (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{where}: expected {kind}{_range_text(section, key)}")


def _range_text(section: str, key: str) -> str:
    low, high = RANGES.get((section, key), (None, None))
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""
