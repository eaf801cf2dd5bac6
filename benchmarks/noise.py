"""Per-sample noise: the old per-row generator loop vs ssni.rng's counter-based draw vs one plain torch.randn.

Run from the repository root: python benchmarks/noise.py [--reps 200] [--devices cpu cuda]
(about half a minute on 2 CPU cores). Shapes 64x3x32x32 (CIFAR) and 16x3x256x256 (ImageNet);
the draw timed is the reverse step's ``randn_levels``. Calls are interleaved (old, new, plain, old...)
so that a shared machine's load hits all three alike; the best and the median call are recorded in
benchmarks/results/noise-<device>-<date>.json with the machine, torch version, threads and load.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ssni.bench import count_torch_calls
from ssni.rng import SampleNoise, derive_seed, sample_seeds

SHAPES = [(64, 3, 32, 32), (16, 3, 256, 256)]


def old_loop(seeds: list[int], key: tuple, levels: list[int], like: torch.Tensor) -> torch.Tensor:
    """The generator before issue 12: one CPU torch.Generator per row, then one copy to the device."""
    gen, rows = torch.Generator(), []
    for seed, level in zip(seeds, levels):
        gen.manual_seed(derive_seed(seed, *key, level))
        rows.append(torch.randn(like.shape[1:], generator=gen))
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def old_sample_seeds(run_seed: int, ids: list[int], draws: list[int]) -> torch.Tensor:
    """Seeds before issue 12: derive_seed per sample in Python."""
    return torch.tensor([derive_seed(run_seed, i, d) for i, d in zip(ids, draws)], dtype=torch.int64)


def bench_seeds(batch: int, reps: int) -> dict:
    """sample_seeds (vectorised) vs the per-sample Python loop, same values."""
    ids, draws = list(range(batch)), list(range(batch))
    assert torch.equal(old_sample_seeds(3, ids, draws), sample_seeds(3, ids, draws))
    times = {"old_loop": [], "new": []}
    for _ in range(reps):
        times["old_loop"].append(_timed(lambda: old_sample_seeds(3, ids, draws), lambda: None))
        times["new"].append(_timed(lambda: sample_seeds(3, ids, draws), lambda: None))
    return {"what": "sample_seeds", "batch": batch, "reps": reps,
            **{f"{name}_best_ms": round(min(ts) * 1e3, 4) for name, ts in times.items()}}


def torch_calls(shape: tuple[int, ...], device: str) -> dict:
    """Torch calls issued by one draw, old loop vs new, at this shape's batch and at batch 4."""
    counts = {}
    for batch in (4, shape[0]):
        like = torch.zeros((batch, *shape[1:]), device=device)
        noise, levels = SampleNoise.from_ids(0, range(batch)), torch.arange(1, batch + 1, device=device)
        seeds, level_list = noise.seeds.tolist(), levels.tolist()
        for name, fn in (("old_loop", lambda: old_loop(seeds, ("reverse", 0), level_list, like)),
                         ("new", lambda: noise.subset(torch.arange(batch, device=device)).randn_levels(
                             ("reverse", 0), levels, like))):
            fn()
            counts[f"{name}_torch_calls_b{batch}"] = count_torch_calls(fn)
    return counts


def _timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _cpu_timed(fn) -> float:
    """Process CPU time of one call (all threads): less sensitive than wall time to a loaded machine."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench_shape(shape: tuple[int, ...], device: str, reps: int) -> dict:
    batch = shape[0]
    like = torch.zeros(shape, device=device)
    noise = SampleNoise.from_ids(0, range(batch))
    levels = torch.arange(1, batch + 1, device=device)
    idx = torch.arange(batch, device=device)
    seeds, level_list = noise.seeds.tolist(), levels.tolist()
    calls = {
        "old_loop": lambda: old_loop(seeds, ("reverse", 0), level_list, like),
        "new": lambda: noise.subset(idx).randn_levels(("reverse", 0), levels, like),
        "plain_randn": lambda: torch.randn(shape, device=device),
    }
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in calls.values():  # warm-up: tables, allocator, kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            times[name].append(_timed(fn, sync))
            if device == "cpu":
                cpu[name].append(_cpu_timed(fn))
    row = {"shape": list(shape), "device": device, "reps": reps, **torch_calls(shape, device)}
    for name, ts in times.items():
        row[f"{name}_best_ms"] = round(min(ts) * 1e3, 4)
        row[f"{name}_median_ms"] = round(statistics.median(ts) * 1e3, 4)
    if device == "cpu":
        for name, ts in cpu.items():
            row[f"{name}_best_cpu_ms"] = round(min(ts) * 1e3, 4)
        row["new_vs_old_best_cpu"] = round(row["new_best_cpu_ms"] / row["old_loop_best_cpu_ms"], 3)
    row["new_vs_old_best"] = round(row["new_best_ms"] / row["old_loop_best_ms"], 3)
    row["new_vs_old_median"] = round(row["new_median_ms"] / row["old_loop_median_ms"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="interleaved calls per method (ImageNet shape: a tenth)")
    parser.add_argument("--devices", nargs="*", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    for device in args.devices:
        rows = []
        for shape in SHAPES:
            reps = args.reps if shape[0] * shape[2] * shape[3] < 100_000 else max(5, args.reps // 10)
            rows.append(bench_shape(shape, device, reps))
            print(json.dumps(rows[-1]))
        if device == "cpu":
            rows.append(bench_seeds(64, args.reps))
            print(json.dumps(rows[-1]))
        record = {
            "what": "per-sample noise: old per-row loop vs ssni.rng counter-based draw vs plain torch.randn",
            "command": "python benchmarks/noise.py " + " ".join(f"--{k} {v}" for k, v in [("reps", args.reps), ("threads", args.threads)] if v),
            "date_utc": stamp.isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "rows": rows,
        }
        tag = f"-{args.threads}thread" if args.threads else ""
        path = Path(args.out) / f"noise-{device.split(':')[0]}-{stamp.date().isoformat()}{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
