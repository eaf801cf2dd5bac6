"""``ssni bench``: purification and attack costs, side by side, on one machine in one run.

Measured on the same weights and inputs:
- purification throughput for a batch with mixed per-sample levels (those SSNI-N
  picks on the demo's clean test images): ssni's join-when-due scheduler vs the
  authors' common-length scheme (``B * n`` evaluations) vs one sample at a time;
- the floor: network evaluations run vs ``sum_i min(n, t_i)``, and the time of one
  network evaluation at the batch size used;
- continuous batching: ``4 x batch`` images purified at width ``batch`` against the same floor;
- SSNI's overhead: score norms + reweighting as a fraction of purification time;
- bf16 autocast against fp32: network error, purified-image error and prediction agreement on the
  trained MNIST models, and the speed of a CIFAR-sized UNet; ``--compile``: torch.compile;
- attack cost: seconds and peak memory (max RSS of a fresh subprocess) per sample
  for PGD+EOT through the defense, with and without activation checkpointing, at
  two numbers of reverse steps.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .checkpoints.registry import default_weights_dir, load_named
from .data import ImageSet, load_split
from .defense import SSNI
from .denoisers.protocol import CountingModel
from .denoisers.unet import UNet, UNetConfig
from .evaluate.build import calibrate
from .evaluate.config import ExperimentConfig, SSNIConfig
from .purifiers import DiffPure
from .reweight import make_reweight
from .bench_attack import attack_rows
from .evaluate.units import best_time
from .rng import SampleNoise
from .runtime import CPU, on_device, precision_mode


class _TorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_torch_calls(fn) -> int:
    """Torch functions and methods ``fn()`` calls (views included): each costs host time on any device."""
    with _TorchCalls() as mode:
        fn()
    return mode.count


def purification(batch: int = 32, t_star: int = 300, steps: int = 300, repeats: int = 3,
                 stream_batches: int = 4, device: torch.device = CPU) -> dict:
    """Throughput of mixed-level purification under the three schedules, the floor and SSNI's overhead.

    Defaults follow the paper's construction at the demo's level: a grid of ``n = t*``
    reverse steps (DiffPure's 100 steps at t* = 100, here 300 at t* = 300), so a sample that
    SSNI sends to ``t_i < n`` has repeated grid levels that the common-length scheme still pays for.
    ``stream_batches * batch`` images are also purified at width ``batch`` by continuous batching.
    Times are the best of ``repeats`` runs after a warm-up.
    """
    unet, ssni, stream = _demo_ssni(stream_batches * batch, device)
    data = stream.head(batch)
    stream_noise = SampleNoise.from_ids(0, stream.ids)
    noise = stream_noise.subset(torch.arange(batch))
    single = DiffPure(unet, t_star=t_star, steps=steps)
    with torch.inference_mode():
        stream_t = ssni(stream.images, (t_star,), stream_noise).t[0]
        t = stream_t[:batch]
        results = {"batch": batch, "t_star": t_star, "steps": steps, "t_mean": t.float().mean().item(),
                   "t_min": int(t.min()), "t_max": int(t.max()), "floor_evaluations": _floor(t, steps)}
        results.update(_schedule_seconds(unet, single, data.images, t, noise, repeats))
        x_t, levels = 2 * data.images - 1, t.clamp(1, 1000)
        results["seconds_per_evaluation"], results["unit_call_sizes"] = floor_unit(unet, x_t, levels, t, steps)
        results["ssni_seconds"] = best_time(lambda: ssni(data.images, (t_star,), noise), repeats)
        results.update(stream_images=len(stream), stream_floor_evaluations=_floor(stream_t, steps),
                       stream_seconds=best_time(lambda: single.purify(stream.images, stream_t, stream_noise, width=batch),
                                             1, False))
    return results | _purification_ratios(results)


def _demo_ssni(n_images: int, device: torch.device = CPU) -> tuple[CountingModel, SSNI, ImageSet]:
    """The shipped MNIST UNet (counting its calls), the demo's SSNI-N on it, ``n_images`` test images,
    on ``device``."""
    weights = default_weights_dir()
    unet = CountingModel(load_named("mnist-unet", weights).to(device))
    stream = load_split("mnist-5k", "test").head(n_images)
    stream = stream.to(device)
    cfg = ExperimentConfig(ssni=SSNIConfig(reweight="sigmoid"))
    reweight = make_reweight("sigmoid", calibrate(cfg, unet.model, weights), bias=cfg.ssni.bias)
    return unet, SSNI(unet, reweight, n_levels=cfg.ssni.n_levels), stream


def _floor(t: Tensor, steps: int) -> int:
    """Network evaluations a chain of ``n = steps`` needs at least: ``sum_i min(n, t_i)``."""
    return sum(min(steps, int(ti)) for ti in t)


def _schedule_seconds(unet: CountingModel, single: DiffPure, images: Tensor, t: Tensor, noise: SampleNoise,
                      repeats: int) -> dict:
    """Evaluations and seconds: join and common schedulers, one sample at a time, diffusers' loop."""
    results = {}
    for name in ("join", "common"):
        purifier = DiffPure(unet, t_star=single.t_star, steps=single.steps, scheduler=name)
        unet.reset()
        purifier.purify(images, t, noise)  # counts the evaluations; doubles as the warm-up
        results[f"{name}_evaluations"] = unet.evaluations
        results[f"{name}_seconds"] = best_time(lambda: purifier.purify(images, t, noise), repeats, False)
    results["one_at_a_time_seconds"] = best_time(lambda: [single.purify(
        images[i:i + 1], t[i:i + 1], noise.subset(torch.tensor([i]))) for i in range(len(images))], 1, False)
    diffusers_seconds = diffusers_loop_seconds(unet.model, images, t, single.steps)
    if diffusers_seconds is not None:
        results["diffusers_loop_seconds"] = diffusers_seconds
    return results


def _purification_ratios(results: dict) -> dict:
    """Throughputs and time ratios of :func:`purification`'s measurements (floor: evaluations x unit time)."""
    join, per_eval = results["join_seconds"], results["seconds_per_evaluation"]
    diffusers_seconds = results.get("diffusers_loop_seconds")
    return {
        "images_per_second": results["batch"] / join,
        "common_over_join": results["common_seconds"] / join,
        "one_at_a_time_over_join": results["one_at_a_time_seconds"] / join,
        "join_over_floor": join / (results["floor_evaluations"] * per_eval),
        "stream_images_per_second": results["stream_images"] / results["stream_seconds"],
        "stream_over_floor": results["stream_seconds"] / (results["stream_floor_evaluations"] * per_eval),
        **({"diffusers_over_join": diffusers_seconds / join} if diffusers_seconds else {}),
        "ssni_overhead_fraction": results["ssni_seconds"] / join}


def floor_unit(unet, x_t, levels, t, steps: int, sizes: int = 6, repeats: int = 5) -> tuple[float, list[int]]:
    """The floor's unit: the best per-row time of one network call over the call sizes the join
    scheduler uses on levels ``t`` (up to ``sizes`` of them, evenly spread, the largest included),
    each the best of ``repeats`` calls. Per-row cost changes with the rows per call (cache, threads),
    so a unit taken at one size alone can put a run below its own floor."""
    from .purifiers.schedule import join_plan, unique_grid

    used = sorted({len(rows) for rows, _, _ in join_plan([unique_grid(int(ti), steps) for ti in t])})
    picked = sorted({used[round(i * (len(used) - 1) / max(sizes - 1, 1))] for i in range(sizes)} | {used[-1]})
    return min(best_time(lambda: unet(x_t[:k], levels[:k]), repeats) / k for k in picked), picked


def precision(batch: int = 16, t_star: int = 300, steps: int = 30, repeats: int = 3, device: torch.device = CPU) -> dict:
    """bf16 autocast against fp32: speed and error of the networks, and what it changes end to end.

    On the trained MNIST UNet and classifier: output error of one network call, and the
    purified images and DiffPure's predictions on ``batch`` test images. On a CIFAR-sized
    UNet (about 33M parameters, random weights, batch 8): time per call.
    """
    weights = default_weights_dir()
    unet, classifier = load_named("mnist-unet", weights).to(device), load_named("mnist-cnn", weights).to(device)
    data = load_split("mnist-5k", "test").head(batch)
    data = data.to(device)
    noise = SampleNoise.from_ids(0, data.ids)
    purifier = DiffPure(unet, t_star=t_star, steps=steps)
    results: dict = {"device": str(device), "cpu_has_native_bf16": _cpu_has_native_bf16()}

    def bf16():
        return precision_mode("bf16", device)

    with torch.inference_mode():
        x_t, levels = 2 * data.images - 1, torch.full((batch,), t_star, device=device)
        exact = unet(x_t, levels)
        with bf16():
            approx = unet(x_t, levels).float()
        results["mnist_unet_relative_error"] = ((approx - exact).norm() / exact.norm()).item()
        purified = purifier.purify(data.images, None, noise)
        with bf16():
            purified_bf16 = purifier.purify(data.images, None, noise).float()
        results["purified_mean_abs_diff"] = (purified_bf16 - purified).abs().mean().item()
        results["prediction_agreement"] = (classifier(purified_bf16).argmax(1) ==
                                           classifier(purified).argmax(1)).float().mean().item()
        big = UNet(UNetConfig(in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), blocks_per_level=2,
                              attention=True)).eval().to(device)
        x, t = on_device(device, torch.randn(8, 3, 32, 32), torch.randint(1, 1000, (8,)))
        results["cifar_unet_params"] = sum(p.numel() for p in big.parameters())
        results["cifar_unet_fp32_seconds"] = best_time(lambda: big(x, t), repeats)
        with bf16():
            results["cifar_unet_bf16_seconds"] = best_time(lambda: big(x, t), repeats)
            approx_big = big(x, t).float()
        exact_big = big(x, t)
        results["cifar_unet_relative_error"] = ((approx_big - exact_big).norm() / exact_big.norm()).item()
    results["cifar_unet_bf16_speedup"] = results["cifar_unet_fp32_seconds"] / results["cifar_unet_bf16_seconds"]
    return results


def compiled(batch: int = 16, t_star: int = 300, steps: int = 300) -> dict:
    """torch.compile (inductor, dynamic shapes) of the MNIST UNet: compile time and purification speed."""
    weights = default_weights_dir()
    unet = load_named("mnist-unet", weights)
    data = load_split("mnist-5k", "test").head(batch)
    noise = SampleNoise.from_ids(0, data.ids)
    t = torch.randint(1, t_star + 1, (batch,), generator=torch.Generator().manual_seed(0))
    fast = torch.compile(unet, dynamic=True)
    with torch.inference_mode():
        start = time.perf_counter()
        DiffPure(fast, t_star=t_star, steps=steps).purify(data.images, t, noise)
        first = time.perf_counter() - start
        eager = best_time(lambda: DiffPure(unet, t_star=t_star, steps=steps).purify(data.images, t, noise), 1)
        warm = best_time(lambda: DiffPure(fast, t_star=t_star, steps=steps).purify(data.images, t, noise), 1, False)
    return {"batch": batch, "eager_seconds": eager, "compiled_seconds": warm,
            "first_compiled_run_seconds": first, "eager_over_compiled": eager / warm}


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
            x = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen).to(x0.device),
                                    torch.tensor([level - 1], device=x0.device))
            for step in scheduler.timesteps:
                eps = unet(x, torch.full((x.shape[0],), int(step) + 1, device=x.device))
                x = scheduler.step(eps, step, x, generator=gen).prev_sample

    return best_time(run, 1, warmup=False)


class NullNet(torch.nn.Module):
    """A network that does nothing (zeros): what is left of a purification is the host's work."""

    def forward(self, x, t):
        return torch.zeros_like(x)


def host_overhead(shape=(1, 28, 28), batch: int = 40, steps: int = 10, t_star: int = 300, net=None,
                  device: str = "cpu", repeats: int = 5) -> dict:
    """Per reverse step: the scheduler's and step's work outside the network (noise, gathers, step
    arithmetic; a network returning zeros) against one call of ``net`` at that batch."""
    x = torch.rand(batch, *shape, device=device)
    t = torch.randint(t_star // 2, t_star + 1, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    noise = SampleNoise.from_ids(0, range(batch))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn):
        return best_time(lambda: (fn(), sync()), repeats)

    with torch.inference_mode():
        host = timed(lambda: DiffPure(NullNet(), t_star=t_star, steps=steps).purify(x, t, noise)) / steps
        net_s = None if net is None else timed(lambda: net(2 * x - 1, t))
    return {"shape": list(shape), "batch": batch, "steps": steps, "t_star": t_star, "device": device,
            "host_seconds_per_step": host, "network_seconds_per_call": net_s,
            "host_over_network": None if net_s is None else host / net_s}


def machine(device: torch.device = CPU) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": _cpu_name(), "device": str(device), "gpu": gpu}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_bench(out: Path | None = None, quick: bool = True, compile_: bool = False, device: torch.device = CPU) -> dict:
    """Every measurement of the module docstring on ``device`` (GPU memory in the attack rows is the
    peak RSS of the host process: the device's own peak is not read)."""
    net = load_named("mnist-unet", default_weights_dir()).to(device)
    results = {"machine": machine(device), "purification": purification(
                   batch=16 if quick else 32, repeats=1 if quick else 3, stream_batches=2 if quick else 4, device=device),
               "precision": precision(repeats=1 if quick else 3, device=device),
               "host": [host_overhead(batch=b, net=net, repeats=3 if quick else 5, device=str(device))
                        for b in (40, 100)],
               "attack": attack_rows(4 if quick else 16, 1 if quick else 3, device=device)}
    if compile_:
        results["compile"] = compiled(batch=16 if quick else 32)
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
             f"  {p['stream_images']} images at width {p['batch']}  {p['stream_seconds']:.3f} s  "
             f"{p['stream_images_per_second']:.1f} img/s  time / floor x{p['stream_over_floor']:.2f} "
             "(continuous batching)",
             f"  SSNI overhead          {100 * p['ssni_overhead_fraction']:.1f}% of purification time",
             *format_precision(results["precision"]),
             *([f"torch.compile: purification x{results['compile']['eager_over_compiled']:.2f} faster than eager "
                f"(first run {results['compile']['first_compiled_run_seconds']:.0f} s with compiling)"]
               if "compile" in results else []),
             *[f"host work per reverse step (network returning zeros), MNIST batch {h['batch']}: "
               f"{1e3 * h['host_seconds_per_step']:.2f} ms = {100 * h['host_over_network']:.1f}% of one network call"
               for h in results.get("host", [])],
             "attack: PGD (2 steps) + EOT 2; floor = 2 x 2 x ((score rows + reverse steps) x fwd+bwd[+recompute] "
             "+ classifier) per sample (the --plan model)",
             f"  {'defense':<32} {'reverse steps':>13} {'checkpoint':>10} {'EOT stacked':>11} {'s/sample':>9} "
             f"{'/ floor':>8} {'peak RSS MB':>12}"]
    for row in results["attack"]:
        floor = f"x{row['over_floor']:.2f}" if "over_floor" in row else "-"
        lines.append(f"  {row.get('defense', 'DiffPure t*=150'):<32} {row['reverse_steps']:>13} "
                     f"{str(row['checkpoint']):>10} {row.get('eot_batch', 1):>11} "
                     f"{row['seconds_per_sample']:>9.3f} {floor:>8} {row['peak_rss_mb']:>12.0f}")
    return "\n".join(lines)


def format_precision(q: dict) -> list[str]:
    native = "native bf16" if q["cpu_has_native_bf16"] else "no native bf16 on this CPU"
    return [f"bf16 autocast ({native}): MNIST UNet relative error {100 * q['mnist_unet_relative_error']:.2f}%, "
            f"purified images mean |diff| {q['purified_mean_abs_diff']:.4f}, "
            f"predictions agree {100 * q['prediction_agreement']:.1f}%",
            f"  {q['cifar_unet_params'] / 1e6:.1f}M-parameter UNet, batch 8: fp32 {q['cifar_unet_fp32_seconds']:.3f} s, "
            f"bf16 {q['cifar_unet_bf16_seconds']:.3f} s (x{q['cifar_unet_bf16_speedup']:.2f}), "
            f"relative error {100 * q['cifar_unet_relative_error']:.2f}%"]
