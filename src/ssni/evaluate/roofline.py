"""How far a plan is from its floor: the run's network FLOPs at the device's measured matrix peak.

The FLOPs of one forward row of the diffusion network and of the classifier are counted by
torch's FLOP counter (convolutions, matrix products, attention). The run's FLOPs follow the plan's
own cost model (:func:`ssni.evaluate.costs.predict`) with FLOPs in place of seconds: a forward row
costs ``F``, a forward and backward row ``3 F`` (activation checkpointing's recomputation is
overhead, not part of the floor). The floor is those FLOPs at the peak of a large square matrix
product on the same device, measured in the run's precision and in bf16 (the fastest format a
network of this kind runs in).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ..defense import Defense, resize
from .costs import RunShape, predict
from .units import Units


def forward_flops(fn) -> int:
    """FLOPs torch's counter sees while ``fn()`` runs (no gradient)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


def network_flops(model: Defense, x: Tensor) -> tuple[int, int]:
    """``(diffusion network, classifier)`` FLOPs of one forward row."""
    x = x[:1]
    x_model = 2 * resize(x, model.resolution) - 1
    t = torch.full((1,), max(model.purifier.t_stars), device=x.device)
    return forward_flops(lambda: model.purifier.model(x_model, t)), forward_flops(lambda: model.classifier(x))


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` ``size x size`` matrix products on ``device`` (under the
    caller's TF32 setting for float32)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms up
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def roofline(cfg, model: Defense, x: Tensor, plan: dict) -> dict:
    """FLOPs per sample of the planned run and its predicted time against the floor (``plan`` from
    :func:`ssni.evaluate.plan.make_plan` of the same config, resolved)."""
    net, cls = network_flops(model, x)
    flop_units = Units(step=net, step_grad=3 * net, step_ck=3 * net, classifier=cls, classifier_grad=3 * cls,
                       step_saved_bytes=0, step_input_bytes=0, classifier_saved_bytes=0, weight_bytes=0)
    shape = RunShape(plan["score_rows"], plan["reverse_steps"], plan["probe_clean_accuracy"], plan["votes"],
                     len(model.purifier.t_stars))
    flops = predict(cfg, shape, flop_units, plan["batch"], plan["eot_batch"], False, plan["per_shard"],
                    math.inf)["seconds"]  # the cost model, in FLOPs
    precision = cfg.evaluate.precision
    run_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peaks = {precision: matmul_peak(x.device, run_dtype)}
    if precision != "bf16":
        peaks["bf16"] = matmul_peak(x.device, torch.bfloat16)
    floors = {name: flops / peak for name, peak in peaks.items()}
    return {"network_forward_flops": net, "classifier_forward_flops": cls, "flops_per_shard": flops,
            "flops_per_sample": flops / max(plan["per_shard"], 1), "matmul_peak_flops": peaks,
            "floor_seconds": floors, "plan_over_floor": {k: plan["seconds"] / f for k, f in floors.items() if f > 0}}


def format_roofline(r: dict) -> str:
    peaks = ", ".join(f"{name} {p / 1e12:.2f} TFLOP/s" for name, p in r["matmul_peak_flops"].items())
    ratios = ", ".join(f"{ratio:.1f}x the {name} floor ({r['floor_seconds'][name] / 3600:.3g} h)"
                       for name, ratio in r["plan_over_floor"].items())
    return (f"  network FLOPs: {r['network_forward_flops'] / 1e9:.3g} GFLOP per forward row (classifier "
            f"{r['classifier_forward_flops'] / 1e9:.3g}); {r['flops_per_sample'] / 1e15:.4g} PFLOP per sample\n"
            f"  measured matrix peak {peaks}: the predicted time is {ratios}")
