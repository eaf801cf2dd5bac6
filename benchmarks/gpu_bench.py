"""The measuring steps of ``benchmarks/gpu.sh``, one subcommand each, each writing its own JSON.

    python benchmarks/gpu_bench.py roofline  --out DIR [--smoke]   # DDPM++ deep per row: TFLOP/s per mode
    python benchmarks/gpu_bench.py purify    --out DIR [--smoke]   # join vs the authors' scheme, 1-at-a-time, diffusers
    python benchmarks/gpu_bench.py attack    --out DIR [--smoke]   # PGD+EOT against its floor, sized to fit
    python benchmarks/gpu_bench.py slice     --out DIR [--smoke]   # the paper row's --plan beside a measured slice

``--smoke`` runs every step at tiny sizes on the CPU (minutes): it checks the script, not the machine.
Networks have random weights (seeded): speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ssni.bench import machine
from ssni.runtime import precision_mode, resolve_device


def best(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls after a warm-up, the device queue drained around each."""
    from ssni.evaluate.units import best_time

    return best_time(fn, repeats)


def ddpmpp_deep(device, smoke: bool):
    from ssni.denoisers.score_sde import ScoreSDEConfig, ScoreSDEEps, ScoreSDENet

    torch.manual_seed(0)
    config = ScoreSDEConfig(nf=16, num_res_blocks=1) if smoke else ScoreSDEConfig()
    return ScoreSDEEps(ScoreSDENet(config)).to(device).eval()


def roofline(device, smoke: bool) -> dict:
    """Per-row forward and forward+backward of DDPM++ deep at batch 128 in each mode, as TFLOP/s of its
    counted FLOPs, beside the measured matrix peaks."""
    from ssni.diffusion import trusted_levels
    from ssni.evaluate.roofline import forward_flops, matmul_peak
    from ssni.runtime import compile_network

    net, batch = ddpmpp_deep(device, smoke), 2 if smoke else 128
    x, t = torch.randn(batch, 3, 32, 32, device=device), torch.randint(1, 1000, (batch,), device=device)
    flops = forward_flops(lambda: net(x[:1], t[:1]))
    peaks = {p: matmul_peak(device, d, 256 if smoke else None) / 1e12
             for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    with precision_mode("tf32", device):
        peaks["tf32"] = matmul_peak(device, torch.float32, 256 if smoke else None) / 1e12
    rows = []
    variants = [("eager", p, False) for p in ("fp32", "tf32", "bf16")] + [("eager-channels_last", p, True)
                                                                          for p in ("fp32", "bf16")]
    if not smoke:  # inductor takes minutes on a CPU: the smoke run checks the eager path only
        variants += [("compiled", p, False) for p in ("tf32", "bf16")] + [("compiled-reduce-overhead", "bf16", False)]
    for kind, precision, channels_last in variants:
        model = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if kind.startswith("compiled"):
            model = compile_network(net, "reduce-overhead" if "reduce" in kind else None)
        xs = x.to(memory_format=torch.channels_last) if channels_last else x
        with precision_mode(precision, device), trusted_levels():
            start = time.perf_counter()
            fwd = best(lambda: _forward(model, xs, t))
            compile_seconds = time.perf_counter() - start if kind.startswith("compiled") else None
            both = best(lambda: _backward(model, xs, t))
        rows.append({"kind": kind, "precision": precision, "batch": batch, "forward_ms_per_row": 1e3 * fwd / batch,
                     "forward_tflops": flops * batch / fwd / 1e12, "fwd_bwd_ms_per_row": 1e3 * both / batch,
                     "fwd_bwd_tflops": 3 * flops * batch / both / 1e12, "first_calls_seconds": compile_seconds})
        print(json.dumps(rows[-1]), flush=True)
    net.to(memory_format=torch.contiguous_format)
    return {"network": "DDPM++ deep (score-SDE cifar10_ddpmpp_deep_continuous)", "gflop_per_row": flops / 1e9,
            "matmul_peak_tflops": peaks, "rows": rows}


def _forward(model, x, t):
    with torch.no_grad():
        return model(x, t)


def _backward(model, x, t):
    z = x.detach().requires_grad_(True)
    return torch.autograd.grad(model(z, t).float().square().sum(), z)


def purify(device, smoke: bool) -> dict:
    """Mixed-level purification (t* = 100, 100 steps, levels 20-100) of a CIFAR-sized DDPM UNet at batch 64
    and 128: join-when-due vs the authors' common-length scheme vs one at a time vs diffusers' loop."""
    from ssni.bench import _purification_ratios, _schedule_seconds, floor_unit
    from ssni.denoisers import UNet, UNetConfig
    from ssni.denoisers.protocol import CountingModel
    from ssni.purifiers import DiffPure
    from ssni.rng import SampleNoise

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=3, base_channels=16 if smoke else 128, channel_mults=(1, 2, 2, 2),
                          blocks_per_level=1 if smoke else 2, attention=True)).to(device).eval()
    t_star, steps, rows = (10, 10, []) if smoke else (100, 100, [])
    for batch in (2,) if smoke else (64, 128):
        gen = torch.Generator().manual_seed(batch)
        images = torch.rand(batch, 3, 32, 32, generator=gen).to(device)
        t = torch.randint(t_star // 5, t_star + 1, (batch,), generator=gen).to(device)
        noise, counting = SampleNoise.from_ids(0, range(batch)), CountingModel(net)
        with torch.inference_mode():
            r = {"batch": batch, "t_star": t_star, "steps": steps,
                 "floor_evaluations": sum(min(steps, int(v)) for v in t)}
            r.update(_schedule_seconds(counting, DiffPure(counting, t_star=t_star, steps=steps), images, t, noise, 1))
            r["seconds_per_evaluation"], _ = floor_unit(net, 2 * images - 1, t, t, steps, repeats=3)
            r.update(stream_images=batch, stream_seconds=r["join_seconds"], stream_floor_evaluations=r["floor_evaluations"],
                     ssni_seconds=0.0)  # no SSNI here: the levels are drawn
        rows.append(r | _purification_ratios(r))
        print(json.dumps(rows[-1]), flush=True)
    return {"params_M": sum(p.numel() for p in net.parameters()) / 1e6, "rows": rows}


def attack(device, smoke: bool) -> dict:
    """PGD (2 steps) x EOT 4 through DiffPure on DDPM++ deep at 10 reverse steps, 64 images: time against
    the plan's floor, checkpointing on/off and stacked EOT, each only where the plan says it fits."""
    from ssni.attacks import PGD, ThreatModel
    from ssni.classifiers import SmallCNN, SmallCNNConfig
    from ssni.defense import Defense
    from ssni.evaluate.config import AttackConfig
    from ssni.evaluate.costs import MEMORY_MARGIN, attack_cost, attack_row_bytes, free_bytes
    from ssni.evaluate.units import measure_units
    from ssni.purifiers import DiffPure

    net, n, reverse = ddpmpp_deep(device, smoke), 2 if smoke else 64, 2 if smoke else 10
    classifier = SmallCNN(SmallCNNConfig(in_channels=3)).to(device).eval()
    x, y = torch.rand(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)
    rows = []
    for checkpoint in (False, True):
        defense = Defense(classifier, DiffPure(net, t_star=100, steps=reverse, checkpoint=checkpoint)).eval()
        for eot_batch in (1,) if smoke else (1, 2, 4):
            u = measure_units(defense, x, n * eot_batch, n * eot_batch, 1 if smoke else 3)
            need = attack_row_bytes(u, 0, reverse, checkpoint) * n * eot_batch
            if need > MEMORY_MARGIN * free_bytes(device)[0]:
                rows.append({"checkpoint": checkpoint, "eot_batch": eot_batch, "skipped": f"needs {need / 2**30:.1f} GiB"})
                continue
            pgd = PGD(ThreatModel("linf", 8 / 255), steps=2, step_size=2 / 255, eot=4, eot_batch=eot_batch)
            seconds = best(lambda: pgd(defense, x, y), 1)
            floor = n * attack_cost(AttackConfig(steps=2, eot=4), u, 0, reverse, 1, checkpoint)
            rows.append({"checkpoint": checkpoint, "eot_batch": eot_batch, "n": n, "reverse_steps": reverse,
                         "seconds_per_sample": seconds / n, "over_floor": seconds / floor,
                         "fwd_bwd_ms_per_row": 1e3 * u.step_grad, "checkpointed_ms_per_row": 1e3 * u.step_ck})
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def paper_slice(device, smoke: bool) -> dict:
    """The CIFAR-10 DiffPure + SSNI-N l_inf preset (random weights): its --plan with "auto" settings,
    and a 16-image slice with PGD cut to 2 steps, planned and measured with the same settings."""
    from ssni.evaluate import evaluate, load_config
    from ssni.evaluate.plan import plan_run
    import tempfile

    preset = Path("configs") / ("mnist-diffpure-ssni-n.toml" if smoke else "cifar10-wrn28-diffpure-ssni-n-linf.toml")
    base = {"evaluate.device": str(device), "models.random_init": True}
    full = plan_run(load_config(preset, base), probe=4)
    n = 2 if smoke else 16
    cut = {**base, "data.n": n, "attacks.0.steps": 1 if smoke else 2}
    if smoke:
        cut["attacks.0.eot"] = 1
    cfg = load_config(preset, cut)
    sliced = plan_run(cfg, probe=4)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        evaluate(cfg, Path(tmp), progress=False)
        measured = time.perf_counter() - start
    return {"preset": preset.name, "paper_row_plan_hours": full["seconds"] / 3600, "paper_row_plan": full,
            "slice_images": n, "slice_plan_seconds": sliced["seconds"], "slice_measured_seconds": measured,
            "slice_measured_over_plan": measured / sliced["seconds"]}


STEPS = {"roofline": roofline, "purify": purify, "attack": attack, "slice": paper_slice}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = resolve_device("cpu" if args.smoke else "cuda")
    result = {"machine": machine(device), "smoke": args.smoke, "step": args.step,
              **STEPS[args.step](device, args.smoke)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{args.step}{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
