"""The plan's cost model: a run counted in per-row units, before it starts.

A probe of the evaluated images gives the run's shape (:class:`RunShape`: score-norm rows and
reverse steps per sample and vote, the attacked share); :func:`predict` counts a shard of samples
in measured per-row units (:class:`ssni.evaluate.units.Units`) at given speed settings (batch,
stacked EOT draws, checkpointing): seconds of the clean pass, of every attack with its re-scoring,
and the bytes the attack and the score-norm pass hold. ``--plan`` (:mod:`ssni.evaluate.plan`)
predicts with it, ``"auto"`` (:mod:`ssni.evaluate.auto`) compares candidates with it, and the
roofline (:mod:`ssni.evaluate.roofline`) counts FLOPs with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..attacks.adaptive import AdaptiveAttack as ADAPTIVE
from ..attacks.apgd import APGD
from ..defense import Defense
from .config import AttackConfig, ExperimentConfig
from .units import Units


ITERATIONS = {"pgd": lambda a: a.steps, "bpda": lambda a: a.steps, "adaptive": lambda a: a.steps * a.restarts,
              "apgd": lambda a: a.steps * a.restarts, "transfer": lambda a: a.steps * a.restarts,
              "autoattack": lambda a: a.steps * a.restarts * (1 if a.version.startswith("apgd") else 2)}
TARGETED_RUNS = APGD.target_classes  # a targeted APGD runs once per likely other class
MEMORY_MARGIN = 0.8  # share of free device memory a plan lets a run use


def steps_per_sample(model: Defense, x: Tensor) -> tuple[float, float]:
    """``(score-norm rows, reverse steps)`` per sample and vote: levels from SSNI on ``x`` (or ``t*``)."""
    from ..defense import resize

    with torch.no_grad():
        lv = model.levels(resize(x, model.resolution), model._noise(x, None, 0, 0), model.max_rows)
    p = model.purifier
    t = (lv.start if lv.start is not None else lv.t).float()
    n = None if p.steps is None else p.steps + lv.extra_steps
    reverse = t.sum(0) if n is None else t.clamp_max(n).sum(0)
    return float(model.ssni.n_levels if model.ssni is not None else 0), float(reverse.mean())


def attack_cost(a: AttackConfig, u: Units, score: float, reverse: float, votes: int,
                checkpointed: bool, rounds: int = 1) -> float:
    """Seconds per attacked sample: iterations (x targets when targeted) x EOT x votes x one forward
    + backward of the defense. A surrogate chain has at most ``surrogate_steps`` steps per round and
    its levels are computed without gradient; checkpointing recomputes the score-norm rows too."""
    per_row = u.step_ck if checkpointed else u.step_grad
    if a.name == "bpda" or a.gradient == "bpda":  # forward through the defense, backward through the classifier
        per_draw = (score + reverse) * u.step + u.classifier_grad
    elif a.gradient == "surrogate":
        per_draw = score * u.step + min(reverse, a.surrogate_steps * rounds) * per_row + u.classifier_grad
    else:
        per_draw = (score + reverse) * per_row + u.classifier_grad
    runs = TARGETED_RUNS if a.targeted else 1
    iterations = ITERATIONS.get(a.name, ITERATIONS["pgd"])(a) * runs * a.eot * votes
    if a.name != "adaptive":
        return iterations * per_draw
    return iterations * (1 + ADAPTIVE.unconstrained) * per_draw + adaptive_extra(a, u, score, reverse, votes, per_row)


def adaptive_extra(a: AttackConfig, u: Units, score: float, reverse: float, votes: int, per_row: float) -> float:
    """What the adaptive attack (:mod:`ssni.attacks.adaptive`) adds per sample to its iterations'
    passes (counted, with its unconstrained APGD run, by :func:`attack_cost`): the restoration's
    score-norm passes with gradient, the start's estimate, and the held-out choice among its
    shortlist, the clean input and the APGD output (forward passes without gradient)."""
    restoration = a.steps * ADAPTIVE.restore_steps * score * per_row
    start = (score + reverse) * per_row + u.classifier_grad
    choice = (ADAPTIVE.shortlist + 2) * ADAPTIVE.heldout_draws * ((score + reverse) * u.step + u.classifier)
    return a.restarts * a.eot * votes * (restoration + start) + votes * choice


def attack_row_bytes(u: Units, score: float, reverse: float, checkpointed: bool) -> float:
    """Bytes per attacked row kept for one backward: the score-norm rows and the reverse chain (each
    call's activations, or with checkpointing each call's input plus one call's activations at a
    time), the classifier."""
    calls = score + reverse
    if not checkpointed:
        return calls * u.step_saved_bytes + u.classifier_saved_bytes
    live_step = max(u.step_saved_bytes, u.cuda_step_peak_bytes or 0.0)
    return calls * u.step_input_bytes + live_step + u.classifier_saved_bytes


def resident_bytes(device: torch.device) -> int:
    """What the process holds now: CUDA memory allocated, or the CPU process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        import os
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def free_bytes(device: torch.device) -> tuple[int, str]:
    """Memory a run may use on ``device`` and how it was read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "torch.cuda.mem_get_info (free)"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    return 0, "unknown"


@dataclass
class RunShape:
    """What a probe of the evaluated images says about the run, per sample and vote."""

    score: float  # score-norm rows
    reverse: float  # reverse steps
    accuracy: float  # clean accuracy on the probe: the attacked share
    votes: int
    rounds: int


def probe_shape(model: Defense, x: Tensor, y: Tensor | None, max_rows: int | None) -> RunShape:
    """Levels and clean accuracy of the probe ``x, y`` (no labels: every sample counts as attacked)."""
    own_cap = model.max_rows
    model.max_rows = max_rows or x.shape[0]  # the probes themselves: at most one level's rows per score-norm call
    try:
        with torch.no_grad():
            accuracy = 1.0 if y is None else float((model.predict(x, draw=0) == y).float().mean())
        score, reverse = steps_per_sample(model, x)
    finally:
        model.max_rows = own_cap
    return RunShape(score, reverse, accuracy, model.votes, len(model.purifier.t_stars))


def predict(cfg: ExperimentConfig, shape: RunShape, u: Units, batch: int, eot_batch: int, checkpointed: bool,
            per_shard: int, usable: float) -> dict:
    """Seconds and bytes of one shard of ``per_shard`` samples at these speed settings (per-row units ``u``)."""
    one_pass = shape.score * u.step + shape.reverse * u.step + u.classifier
    clean = shape.votes * one_pass + shape.score * u.step  # predict, then explain's score norm
    attacked = per_shard * shape.accuracy
    attacks = [{"name": a.name, "seconds": attacked * (
        attack_cost(a, u, shape.score, shape.reverse, shape.votes, checkpointed, shape.rounds)
        + cfg.evaluate.rescore_draws * shape.votes * one_pass)} for a in cfg.attacks]
    row_bytes = attack_row_bytes(u, shape.score, shape.reverse, checkpointed) * shape.votes
    memory, inference_batch_fit = _inference_memory(max(shape.score, 1), batch, cfg.evaluate.max_rows,
                                                    u.step_live_bytes, usable)
    rows_fit = max(int(usable // row_bytes), 0) if row_bytes > 0 and math.isfinite(usable) else 10 ** 9
    return {"batch": batch, "eot_batch": eot_batch, "checkpoint": checkpointed, "clean_seconds": per_shard * clean,
            "attacks": attacks, "seconds": per_shard * clean + sum(a["seconds"] for a in attacks),
            "attack_bytes": eot_batch * batch * row_bytes, "attack_bytes_per_sample": eot_batch * row_bytes,
            "fits": eot_batch * batch * row_bytes <= usable and memory["inference_fits"], **memory,
            "max_batch": min(rows_fit // eot_batch, inference_batch_fit),
            "max_eot_batch": rows_fit // batch if memory["inference_fits"] else 0}


def _inference_memory(score: float, batch: int, cap: int | None, live_per_row: float,
                      usable: float) -> tuple[dict, int]:
    """The score-norm pass without gradient: ``score x batch`` rows per call (at most ``cap``), each
    holding ``live_per_row`` bytes at its peak; the plan's fields (``max_rows`` that fit ``usable``
    among them) and the largest batch whose call fits."""
    rows = min(score * batch, cap or math.inf)
    most_rows = int(usable // live_per_row) if live_per_row > 0 else 10 ** 9
    batch_fit = 10 ** 9 if cap is not None and cap <= most_rows else int(most_rows // score)
    return {"inference_rows_per_call": rows, "inference_bytes": rows * live_per_row,
            "inference_fits": rows <= most_rows, "max_rows_fit": most_rows}, batch_fit
