"""``ssni evaluate --plan``: predicted wall time and peak memory of a configured run, before it starts.

A few calls of the configured networks on the chosen device give the units (per row, at the
row counts the run uses):

- ``step``: one reverse step of the purifier (network + noise + step arithmetic), inference;
- ``step_grad``: the same forward with autograd on, plus its backward to the input;
- ``step_ck``: ``step_grad`` under activation checkpointing (the recomputed forward included);
- ``classifier`` / ``classifier_grad``: the classifier's forward, and forward + backward;
- memory: the bytes autograd saves for backward per row of one reverse step, counted exactly
  with ``torch.autograd.graph.saved_tensors_hooks`` (device independent), the step's input
  (what checkpointing keeps), the weights, and on CUDA also ``max_memory_allocated``; and the
  most bytes an inference step holds at once per row (:func:`ssni.evaluate.units.peak_live_bytes`), since the
  score-norm pass without gradient runs all ``N x B`` rows in one call.

The run is then counted in those units, following :mod:`ssni.evaluate.runner`: a clean pass
(one draw; score norm + purification + classifier per vote, and the score norm again for the
levels the store records), every attack of the cascade on the clean-correct samples (iterations x
EOT x votes x (score norm + reverse steps + classifier), forward and backward), and the re-score
of each adversarial example on ``rescore_draws`` fresh draws. Reverse steps per sample are
``sum_r min(n, t_r)``, with the levels SSNI picks on a probe batch of the evaluated images. The
attacked fraction is the probe's clean accuracy, and every attack of the cascade is counted on all
of it (an upper bound: later attacks only see samples still robust).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data import IMAGE_FORMATS
from ..defense import Defense
from ..runtime import halving_on_oom, on_device
from .auto import format_choice, resolve_auto, without_auto
from .config import ExperimentConfig
from .costs import MEMORY_MARGIN, free_bytes, predict, probe_shape, resident_bytes
from .roofline import format_roofline, roofline
from .units import Units, measure_units

def make_plan(cfg: ExperimentConfig, model: nn.Module, x: Tensor, y: Tensor | None, n: int, world: int = 1,
              repeats: int = 3) -> dict:
    """The prediction for ``n`` samples over ``world`` shards; ``x, y``: a probe of the evaluated images."""
    cfg = without_auto(cfg)
    per_shard = math.ceil(n / world)
    batch = min(cfg.evaluate.batch_size, per_shard)
    if not isinstance(model, Defense):
        return {"n": n, "shards": world, "note": "no purifier: the classifier alone costs little"}
    baseline, ck = resident_bytes(x.device), model.purifier.checkpoint
    eot_batch = max((a.eot_batch for a in cfg.attacks), default=1)
    shape = probe_shape(model, x, y, cfg.evaluate.max_rows)
    u, measured_rows = _measure_fitting_units(model, x, batch, eot_batch, repeats)
    free, how = free_bytes(x.device)
    run = predict(cfg, shape, u, batch, eot_batch, ck, per_shard, MEMORY_MARGIN * free)  # free: models loaded
    return {"n": n, "shards": world, "per_shard": per_shard, **run, "device": str(x.device), "votes": shape.votes,
            "score_rows": shape.score, "reverse_steps": shape.reverse, "probe_clean_accuracy": shape.accuracy,
            "units": vars(u), "peak_bytes": baseline + max(run["attack_bytes"], run["inference_bytes"]),
            "free_bytes": free, "baseline_bytes": baseline,
            "memory_method": f"models loaded ({'CUDA memory_allocated' if x.device.type == 'cuda' else 'process RSS'})"
                             f" + the larger of autograd's saved bytes (attack) and the score-norm call's live bytes"
                             f" (inference); free memory from {how}",
            "measured_rows": measured_rows}


def _measure_fitting_units(model: Defense, x: Tensor, batch: int, eot_batch: int, repeats: int) -> tuple[Units, int]:
    """:func:`measure_units` at the run's rows, or, when one step's backward at those rows runs out of
    device memory, at half as many until it fits (per-row units; the plan then says the batch is too big).
    One row that does not fit is a :class:`ssni.errors.ResourceError` (:func:`ssni.runtime.halving_on_oom`)."""
    return halving_on_oom(lambda rows: measure_units(model, x, rows, eot_batch * rows, repeats), batch, x.device)


def format_plan(p: dict) -> str:
    if "attacks" not in p:
        return f"plan: {p['note']}"
    gib = 2 ** 30
    lines = [format_choice(p["auto"])] if p.get("auto") else []
    lines += [f"plan: {p['n']} samples, {p['shards']} shard(s) of {p['per_shard']}, batch {p['batch']}, "
             f"eot_batch {p['eot_batch']}, on {p['device']} (checkpointing {'on' if p['checkpoint'] else 'off'}, "
             f"votes {p['votes']})",
             f"  per sample and draw: {p['score_rows']:.0f} score-norm rows + {p['reverse_steps']:.1f} reverse steps;"
             f" probe clean accuracy {100 * p['probe_clean_accuracy']:.0f}% (attacked share)",
             f"  clean pass            {p['clean_seconds']:9.1f} s"]
    if p.get("calibration_images"):
        lines.append(f"  calibration           {p['calibration_seconds']:9.1f} s  ({p['calibration_images']} images x "
                     f"{p['score_rows']:.0f} levels: no saved calibration matches the config)")
    lines += [f"  attack {a['name']:<14} {a['seconds']:9.1f} s  (with re-scoring)" for a in p["attacks"]]
    lines += [f"  predicted wall time   {p['seconds']:9.1f} s  ({p['seconds'] / 3600:.2f} h per shard)",
              f"  predicted peak memory {p['peak_bytes'] / gib:9.2f} GiB of {p['free_bytes'] / gib:.1f} GiB free "
              f"({p['memory_method']})",
              f"  largest batch that fits at eot_batch {p['eot_batch']}: {p['max_batch']}; "
              f"largest eot_batch at batch {p['batch']}: {p['max_eot_batch']}",
              *([f"  out of device memory at batch {p['batch']}: units measured at {p['measured_rows']} rows"]
                if p["measured_rows"] < p["batch"] else []),
              f"  score-norm pass without gradient: {p['inference_rows_per_call']:.0f} rows per call, "
              f"{p['inference_bytes'] / gib:.2f} GiB (evaluate.max_rows caps the rows; at most "
              f"{p['max_rows_fit']} fit)"]
    if p.get("roofline"):
        lines.append(format_roofline(p["roofline"]))
    if p["shards"] == 1:
        lines.append("  on K devices (torchrun shards): " + ", ".join(
            f"K={k}: {shard_hours(p, k):.2f} h" for k in (2, 4, 8)))
    return "\n".join(lines)


def shard_hours(p: dict, k: int) -> float:
    """Wall time of the same run over ``k`` shards: the clean pass and attacks scale with the samples per
    shard; the calibration runs once per shard (every rank fits it)."""
    samples = p["per_shard"] / max(math.ceil(p["n"] / k), 1)
    fixed = p.get("calibration_seconds", 0.0)
    return ((p["seconds"] - fixed) / samples + fixed) / 3600


def plan_run(cfg: ExperimentConfig, weights_dir: Path | None = None, world: int | None = None,
             probe: int = 16) -> dict:
    """Load the configured models as a run does, probe them on the first ``probe`` images, predict.

    Without the dataset on this machine the probe is uniform noise of the dataset's shape and every
    sample counts as attacked: the levels and the attacked share are then guesses, the units are
    measured all the same. Without a saved calibration that matches the config, SSNI is calibrated on
    the probe, and the run's own calibration (``calibration_size`` images) is counted, not run.
    """
    import os

    from ..checkpoints.registry import default_weights_dir
    from ..errors import InputError
    from ..runtime import resolve_device
    from .build import build_model, load_eval_data, load_models, saved_calibration
    from .runner import precision, to_device

    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    weights_dir = Path(weights_dir or default_weights_dir())
    unet, classifier = to_device(cfg, *load_models(cfg, weights_dir))
    device = resolve_device(cfg.evaluate.device)
    try:
        data = load_eval_data(cfg, min(probe, cfg.data.n))
        (x, y), synthetic = on_device(device, data.images, data.labels), False
    except InputError:  # the data is not on this machine (a config mistake is raised, not guessed around)
        mode, size = IMAGE_FORMATS[cfg.data.dataset]
        shape = (1 if mode == "L" else 3, size, size)
        probe_images = torch.rand(min(probe, cfg.data.n), *shape, generator=torch.Generator().manual_seed(0))
        (x,), y, synthetic = on_device(device, probe_images), None, True
    calibration, to_fit = None, 0
    if cfg.ssni.reweight != "none":
        calibration = saved_calibration(cfg, weights_dir)[0]  # calibration_split == data.split fails here
        if calibration is None:  # the run fits one: counted below, not run here
            calibration, to_fit = _probe_calibration(cfg, unet, x), cfg.ssni.calibration_size
    model = build_model(cfg, unet, classifier, calibration)
    with precision(cfg):
        cfg, choice = resolve_auto(cfg, model, x, y, world)
        plan = make_plan(cfg, model, x, y, cfg.data.n, world)
        plan["auto"] = choice
        if "units" in plan:
            plan["roofline"] = roofline(cfg, model, x, plan)
    if "units" in plan:
        plan["calibration_images"] = to_fit
        plan["calibration_seconds"] = to_fit * cfg.ssni.n_levels * plan["units"]["step"]
        plan["seconds"] += plan["calibration_seconds"]
    plan["synthetic_probe"] = synthetic
    return plan


def _probe_calibration(cfg: ExperimentConfig, unet: nn.Module, x: Tensor):
    from ..defense import resize
    from ..diffusion import VPSchedule
    from ..reweight import Calibration
    from ..score_norm import dataset_score_norms

    images = resize(x, cfg.purifier.resolution)
    images = images.repeat(2, 1, 1, 1) if len(images) == 1 else images  # a fit needs 2 norms: two noise draws
    norms = dataset_score_norms(unet, VPSchedule(), images, torch.arange(len(images)), 0, cfg.ssni.n_levels,
                                max_rows=cfg.evaluate.max_rows or len(x))
    return Calibration.fit(norms, note="probe images (no saved calibration matches the config)")
