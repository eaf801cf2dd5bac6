"""``"auto"`` speed settings: the fastest batch size, stacked EOT draws and checkpointing that fit.

``evaluate.batch_size``, ``attacks[*].eot_batch`` and ``purifier.checkpoint`` may be ``"auto"``.
Before a run (and in ``--plan``) one reverse step of the purifier and the classifier are timed on
the run's device at growing row counts (1, 2, 4, ... until the time per row stops falling by
:data:`SATURATION`, the device runs out of memory, or the largest useful width is reached). Every
candidate (batch, checkpointing, and each attack's own eot_batch) is then predicted by the plan's
cost model (:func:`ssni.evaluate.costs.predict`) with the units measured at its own row counts (an
attack's rows are ``batch x eot_batch x`` the attacked share). Attacks run one after another, so
each ``"auto"`` attack takes the fastest ``eot_batch`` that fits for itself (a set one is kept), and
the fastest candidate that fits wins; among candidates within :data:`TIE` of the fastest, one
without checkpointing (no recomputed forward) and then the one that needs the least memory. The
choice records the settings it chose, and only those. All three settings are speed-only (outside
the config hash): results do not depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields, replace

import torch
from torch import Tensor, nn

from ..defense import Defense
from ..runtime import smaller_after_oom, unless_out_of_memory
from . import costs
from . import units as unit_measure
from .config import ExperimentConfig
from .units import Units

FALLBACK = {"batch_size": 16, "eot_batch": 1, "checkpoint": True}  # where nothing is measured: small and safe
SATURATION = 0.05  # a doubled width that saves less than this per row twice running ends the measurement
TIE = 0.02
_INFERENCE_FIELDS = ("step", "classifier", "step_live_bytes")  # the rest of Units is the attack's (with gradient)


def has_auto(cfg: ExperimentConfig) -> bool:
    return "auto" in (cfg.evaluate.batch_size, cfg.purifier.checkpoint, *(a.eot_batch for a in cfg.attacks))


def resolved(cfg: ExperimentConfig, batch: int, eot_batch: int | Sequence[int],
             checkpoint: bool) -> ExperimentConfig:
    """``cfg`` with each ``"auto"`` replaced by the given value (set values are kept); ``eot_batch`` is one
    value for every attack or one per attack."""
    pick = lambda value, chosen: chosen if value == "auto" else value  # noqa: E731
    eots = [eot_batch] * len(cfg.attacks) if isinstance(eot_batch, int) else list(eot_batch)
    return replace(cfg, evaluate=replace(cfg.evaluate, batch_size=pick(cfg.evaluate.batch_size, batch)),
                   purifier=replace(cfg.purifier, checkpoint=pick(cfg.purifier.checkpoint, checkpoint)),
                   attacks=tuple(replace(a, eot_batch=pick(a.eot_batch, e)) for a, e in zip(cfg.attacks, eots)))


def without_auto(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with :data:`FALLBACK` values in place of ``"auto"`` (for code that measures nothing)."""
    return resolved(cfg, FALLBACK["batch_size"], FALLBACK["eot_batch"], FALLBACK["checkpoint"])


def _powers(limit: int) -> list[int]:
    return sorted({2 ** k for k in range(max(limit, 1).bit_length()) if 2 ** k <= limit} | {max(limit, 1)})


def measure_widths(model: Defense, x: Tensor, max_width: int, repeats: int = 2) -> dict:
    """Per-row units (:class:`ssni.evaluate.units.Units`) at widths 1, 2, 4, ... up to ``max_width``."""
    units, best, flat = {}, math.inf, 0
    for width in _powers(max_width):
        u = unless_out_of_memory(unit_measure.measure_units, model, x, width, width, repeats)
        if u is None:  # out of memory: the widths so far are the candidates (none: one row does not fit)
            smaller_after_oom(width, x.device)
            break
        units[width] = u
        per_row = u.step + u.step_grad
        flat = flat + 1 if per_row > (1 - SATURATION) * best else 0
        best = min(best, per_row)
        if flat == 2:
            break
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return units


def units_for(units: dict, batch: int, attack_rows: int):
    """Units of a candidate: inference fields at ``batch`` rows, the rest at ``attack_rows`` (the largest
    measured width not above each; past the last width the time per row has stopped falling)."""
    at = lambda rows: units[max([w for w in units if w <= rows] or [min(units)])]  # noqa: E731
    inference, attack = at(batch), at(attack_rows)
    return Units(**{f.name: getattr(inference if f.name in _INFERENCE_FIELDS else attack, f.name)
                    for f in fields(Units)})


def resolve_auto(cfg: ExperimentConfig, model: nn.Module, x: Tensor, y: Tensor | None, world: int = 1,
                 repeats: int = 2) -> tuple[ExperimentConfig, dict]:
    """``(cfg without "auto", what was chosen and why)``; the model's checkpointing is set to the choice."""
    if not has_auto(cfg):
        return cfg, {}
    if not isinstance(model, Defense):
        return resolved(cfg, FALLBACK["batch_size"], 1, False), {"note": "no purifier: nothing to measure"}
    per_shard = math.ceil(cfg.data.n / world)
    shape = costs.probe_shape(model, x, y, cfg.evaluate.max_rows)
    auto = {"batch": cfg.evaluate.batch_size == "auto", "ck": cfg.purifier.checkpoint == "auto",
            "eot": [a.eot_batch == "auto" for a in cfg.attacks]}
    batches = _powers(per_shard) if auto["batch"] else [min(cfg.evaluate.batch_size, per_shard)]  # what runs
    eots = [_powers(a.eot) if is_auto else [a.eot_batch] for a, is_auto in zip(cfg.attacks, auto["eot"])]
    checkpoints = [False, True] if auto["ck"] else [cfg.purifier.checkpoint]
    units = measure_widths(model, x, max(batches) * max((max(e) for e in eots), default=1), repeats)
    usable = costs.MEMORY_MARGIN * costs.free_bytes(x.device)[0]
    options = [option for ck in checkpoints for batch in batches
               if (option := _candidate(cfg, shape, units, batch, eots, ck, per_shard, usable)) is not None]
    fastest = min(options)[0] if options else None
    near = [o for o in options if o[0] <= (1 + TIE) * fastest] if options else []  # then no recompute, less memory
    none_fits = (None, None, 1, tuple(min(e) for e in eots), True)
    seconds, memory, batch, eot_batches, ck = min(near, key=lambda o: (o[4], o[1])) if near else none_fits
    model.purifier.checkpoint = ck if auto["ck"] else model.purifier.checkpoint
    choice = {**_chosen(cfg, auto, batch, eot_batches, ck), "predicted_seconds": seconds,
              "predicted_attack_bytes": memory, "candidates": len(options), "fits": bool(options),
              "widths": {w: {"step": u.step, "step_grad": u.step_grad} for w, u in units.items()}}
    return resolved(cfg, batch, eot_batches, ck), choice


def _chosen(cfg: ExperimentConfig, auto: dict, batch: int, eot_batches: tuple[int, ...], ck: bool) -> dict:
    """The settings that were ``"auto"``, as chosen (``eot_batch`` by attack key ``"k:name"``); set ones are
    the config's and are not repeated here."""
    eot = {f"{k}:{a.name}": e for k, (a, e, is_auto) in enumerate(zip(cfg.attacks, eot_batches, auto["eot"]))
           if is_auto}
    return {**({"batch_size": batch} if auto["batch"] else {}), **({"eot_batch": eot} if eot else {}),
            **({"checkpoint": ck} if auto["ck"] else {})}


def _candidate(cfg: ExperimentConfig, shape: costs.RunShape, units: dict, batch: int, eots: list[list[int]],
               ck: bool, per_shard: int, usable: float) -> tuple | None:
    """``(seconds, attack bytes, batch, eot_batch per attack, ck)`` of the fastest fit at ``batch`` and ``ck``:
    each attack its own fastest ``eot_batch`` among ``eots`` that fits (ties: the least memory); ``None``
    when an attack has none."""
    clean, attacks = None, []
    for a, options in zip(cfg.attacks, eots):
        runs = []
        for e in options:
            rows = max(1, round(batch * e * shape.accuracy))
            run = costs.predict(replace(cfg, attacks=(replace(a, eot_batch=e),)), shape,
                                units_for(units, batch, rows), batch, e, ck, per_shard, usable)
            if run["fits"]:
                runs.append((run["attacks"][0]["seconds"], run["attack_bytes"], e))
                clean = run["clean_seconds"]
        if not runs:
            return None
        fastest = min(runs)[0]
        attacks.append(min((r for r in runs if r[0] <= (1 + TIE) * fastest), key=lambda r: r[1]))
    if not attacks:  # no attack: the clean pass alone
        run = costs.predict(replace(cfg, attacks=()), shape, units_for(units, batch, batch), batch, 1, ck,
                            per_shard, usable)
        return (run["seconds"], 0.0, batch, (), ck) if run["fits"] else None
    seconds, memory = clean + sum(r[0] for r in attacks), max(r[1] for r in attacks)
    return seconds, memory, batch, tuple(r[2] for r in attacks), ck


def format_choice(choice: dict) -> str:
    """The first lines of a run that had ``"auto"`` settings."""
    if not choice:
        return ""
    if "note" in choice:
        return f"auto: {choice['note']}"
    how = (f"fastest of {choice['candidates']} candidates that fit, predicted {choice['predicted_seconds']:.1f} s"
           if choice["fits"] else "no candidate fits the free memory: the smallest, and batches halve on "
                                  "out-of-memory errors")
    widths = ", ".join(f"{w}: {1e3 * u['step_grad']:.2f}" for w, u in choice["widths"].items())
    chosen = ([f"batch_size {choice['batch_size']}"] if "batch_size" in choice else []) + \
        [f"{key} eot_batch {e}" for key, e in choice.get("eot_batch", {}).items()] + \
        ([f"checkpoint {'on' if choice['checkpoint'] else 'off'}"] if "checkpoint" in choice else [])
    return (f"auto: {', '.join(chosen)} ({how}; ms per row of a reverse step with gradient at "
            f"widths {widths})")
