"""``ssni bench``: purification and attack costs, side by side, on one machine in one run.

Measured on the same weights and inputs:
- purification throughput for a batch with mixed per-sample levels (those SSNI-N
  picks on the demo's clean test images): ssni's join-when-due scheduler vs the
  authors' common-length scheme (``B * n`` evaluations) vs one sample at a time;
- the floor: network evaluations run vs ``sum_i min(n, t_i)``, and the time of one
  network evaluation at the batch size used;
- SSNI's overhead: score norms + reweighting as a fraction of purification time;
- attack cost: seconds and peak memory (max RSS of a fresh subprocess) per sample
  for PGD+EOT through the defense, with and without activation checkpointing, at
  two numbers of reverse steps.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .checkpoints.registry import default_weights_dir, load_named
from .data import load_split
from .defense import SSNI
from .denoisers.protocol import CountingModel
from .evaluate.build import calibrate
from .evaluate.config import ExperimentConfig, SSNIConfig
from .purifiers import DiffPure
from .reweight import make_reweight
from .rng import SampleNoise


def _timed(fn, repeats: int = 3, warmup: bool = True) -> float:
    """Best wall time of ``repeats`` runs (after one warm-up run unless ``warmup=False``)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def purification(batch: int = 32, t_star: int = 300, steps: int = 300, repeats: int = 3) -> dict:
    """Throughput of mixed-level purification under the three schedules, the floor and SSNI's overhead.

    Defaults follow the paper's construction at the demo's level: a grid of ``n = t*``
    reverse steps (DiffPure's 100 steps at t* = 100, here 300 at t* = 300), so a sample that
    SSNI sends to ``t_i < n`` has repeated grid levels that the common-length scheme still pays for.
    """
    weights = default_weights_dir()
    unet = CountingModel(load_named("mnist-unet", weights))
    data = load_split("mnist-5k", "test").head(batch)
    cfg = ExperimentConfig(ssni=SSNIConfig(reweight="sigmoid"))
    reweight = make_reweight("sigmoid", calibrate(cfg, unet.model, weights), bias=cfg.ssni.bias)
    ssni = SSNI(unet, reweight, n_levels=cfg.ssni.n_levels)
    noise = SampleNoise.from_ids(0, data.ids)
    with torch.inference_mode():
        t = ssni(data.images, (t_star,), noise).t[0]
        floor = sum(min(steps, int(ti)) for ti in t)
        results = {"batch": batch, "t_star": t_star, "steps": steps, "t_mean": t.float().mean().item(),
                   "t_min": int(t.min()), "t_max": int(t.max()), "floor_evaluations": floor}
        for name in ("join", "common"):
            purifier = DiffPure(unet, t_star=t_star, steps=steps, scheduler=name)
            unet.reset()
            purifier.purify(data.images, t, noise)
            results[f"{name}_evaluations"] = unet.evaluations
            results[f"{name}_seconds"] = _timed(lambda: purifier.purify(data.images, t, noise), repeats)
        single = DiffPure(unet, t_star=t_star, steps=steps)
        results["one_at_a_time_seconds"] = _timed(lambda: [single.purify(
            data.images[i:i + 1], t[i:i + 1], noise.subset(torch.tensor([i]))) for i in range(batch)], 1, False)
        diffusers_seconds = diffusers_loop_seconds(unet.model, data.images, t, steps)
        if diffusers_seconds is not None:
            results["diffusers_loop_seconds"] = diffusers_seconds
        x_t, levels = 2 * data.images - 1, t.clamp(1, 1000)
        results["seconds_per_evaluation"] = _timed(lambda: unet(x_t, levels), repeats) / batch
        results["ssni_seconds"] = _timed(lambda: ssni(data.images, (t_star,), noise), repeats)
    join = results["join_seconds"]
    results.update({
        "images_per_second": batch / join,
        "common_over_join": results["common_seconds"] / join,
        "one_at_a_time_over_join": results["one_at_a_time_seconds"] / join,
        "join_over_floor": join / (floor * results["seconds_per_evaluation"]),
        **({"diffusers_over_join": results["diffusers_loop_seconds"] / join} if diffusers_seconds else {}),
        "ssni_overhead_fraction": results["ssni_seconds"] / join})
    return results


def diffusers_loop_seconds(unet, images, t, steps: int) -> float | None:
    """The loop a user writes with diffusers' ``DDPMScheduler`` (same network, same grids).

    ``step`` takes one timestep for the whole batch, so samples are purified in groups of
    equal ``t*``; ``None`` when diffusers is not installed (``pip install diffusers``).
    """
    try:
        from diffusers import DDPMScheduler
    except ImportError:
        return None
    from .purifiers.schedule import unique_grid

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    gen = torch.Generator().manual_seed(0)

    def run() -> None:
        for level in torch.unique(t).tolist():
            x0 = 2 * images[t == level] - 1
            grid = [g - 1 for g in unique_grid(level, steps)[:-1]]  # diffusers counts from 0
            scheduler.set_timesteps(timesteps=grid)
            x = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), torch.tensor([level - 1]))
            for step in scheduler.timesteps:
                eps = unet(x, torch.full((x.shape[0],), int(step) + 1))
                x = scheduler.step(eps, step, x, generator=gen).prev_sample

    return _timed(run, 1, warmup=False)


ATTACK_SCRIPT = """
import json, resource, sys, time, torch
from ssni.attacks import PGD, ThreatModel
from ssni.checkpoints.registry import default_weights_dir, load_named
from ssni.data import load_split
from ssni.defense import Defense
from ssni.purifiers import DiffPure
steps, use_checkpoint, n = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
w = default_weights_dir()
defense = Defense(load_named("mnist-cnn", w), DiffPure(load_named("mnist-unet", w), t_star=150, steps=steps,
                  checkpoint=use_checkpoint))
data = load_split("mnist-5k", "test").head(n)
start = time.perf_counter()
PGD(ThreatModel("linf", 0.3), steps=2, step_size=0.05, eot=2)(defense, data.images, data.labels)
print(json.dumps({"seconds_per_sample": (time.perf_counter() - start) / n,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def attack_cost(n: int = 16, step_counts: tuple[int, ...] = (10, 40)) -> list[dict]:
    """PGD(2 steps) + EOT(2) through DiffPure, each setting in a fresh process for a clean peak RSS."""
    rows = []
    for steps in step_counts:
        for use_checkpoint in (False, True):
            done = subprocess.run([sys.executable, "-c", ATTACK_SCRIPT, str(steps), str(int(use_checkpoint)), str(n)],
                                  capture_output=True, text=True, check=True)
            rows.append({"reverse_steps": steps, "checkpoint": use_checkpoint, "n": n,
                         **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


def machine() -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_bench(out: Path | None = None, quick: bool = True) -> dict:
    results = {"machine": machine(), "purification": purification(batch=16 if quick else 32,
                                                                  repeats=1 if quick else 3),
               "attack": attack_cost(8 if quick else 32)}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_bench(results: dict) -> str:
    p = results["purification"]
    lines = [f"purification, batch {p['batch']}, t* picked by SSNI-N: mean {p['t_mean']:.1f} "
             f"[{p['t_min']}, {p['t_max']}], grid n = {p['steps']}",
             f"  ssni (join-when-due)   {p['join_seconds']:.3f} s  {p['images_per_second']:.1f} img/s  "
             f"{p['join_evaluations']} evaluations (floor {p['floor_evaluations']})",
             f"  common-length scheme   {p['common_seconds']:.3f} s  x{p['common_over_join']:.2f}  "
             f"{p['common_evaluations']} evaluations",
             f"  one sample at a time   {p['one_at_a_time_seconds']:.3f} s  x{p['one_at_a_time_over_join']:.2f}",
             (f"  diffusers loop         {p['diffusers_loop_seconds']:.3f} s  x{p['diffusers_over_join']:.2f}"
              if "diffusers_loop_seconds" in p else "  diffusers loop         not installed"),
             f"  time / floor           x{p['join_over_floor']:.2f}  ({1e3 * p['seconds_per_evaluation']:.2f} ms "
             "per evaluation at this batch)",
             f"  SSNI overhead          {100 * p['ssni_overhead_fraction']:.1f}% of purification time",
             "attack: PGD (2 steps) + EOT 2 through DiffPure",
             f"  {'reverse steps':>13} {'checkpoint':>10} {'s/sample':>9} {'peak RSS MB':>12}"]
    for row in results["attack"]:
        lines.append(f"  {row['reverse_steps']:>13} {str(row['checkpoint']):>10} {row['seconds_per_sample']:>9.3f} "
                     f"{row['peak_rss_mb']:>12.0f}")
    return "\n".join(lines)
