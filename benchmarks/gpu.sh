#!/usr/bin/env bash
# Run on a lent GPU machine from the repository root: records GPU timings of the benchmark suite.
# Not yet run (no GPU has been lent to a session so far); see benchmarks/README.md.
set -euo pipefail
# The lent machines have no network but a python3 with CUDA torch, safetensors and tqdm: use it as is.
PY=python3
if ! python3 -c "import torch, safetensors, tqdm; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 -m venv .venv-gpu && .venv-gpu/bin/pip install --quiet torch==2.13.0 -e ".[test]" && PY=.venv-gpu/bin/python
fi
mkdir -p benchmarks/results
PYTHONPATH=src "$PY" - <<'PY'
import json, time, torch
from ssni.denoisers import UNet, UNetConfig
from ssni.purifiers import DiffPure
from ssni.rng import SampleNoise
assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
# A CIFAR-10-sized UNet (random weights are fine for timing).
net = UNet(UNetConfig(in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), blocks_per_level=2,
                      attention=True)).to(dev).eval()
params = sum(p.numel() for p in net.parameters())
x = torch.rand(64, 3, 32, 32, device=dev)
t = torch.randint(20, 101, (64,), device=dev)
noise = SampleNoise.from_ids(0, range(64))
out = {"params": params, "device": torch.cuda.get_device_name()}
for name, scheduler in (("join", "join"), ("common", "common")):
    p = DiffPure(net, t_star=100, steps=100, scheduler=scheduler)
    for precision in ("fp32", "bf16"):
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            p.purify(x, t, noise); torch.cuda.synchronize()
            start = time.perf_counter(); y = p.purify(x, t, noise); torch.cuda.synchronize()
        out[f"{name}_{precision}_seconds"] = time.perf_counter() - start
with torch.inference_mode():
    exact = net(2 * x - 1, t)
    with torch.autocast("cuda", torch.bfloat16):
        approx = net(2 * x - 1, t).float()
    out["bf16_relative_error"] = ((approx - exact).norm() / exact.norm()).item()
    # floor: best of 10 full-batch calls; continuous batching of 4 batches at width 64
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize(); start = time.perf_counter(); net(2 * x - 1, t); torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    out["seconds_per_evaluation"] = best / 64
    xs, ts = torch.rand(256, 3, 32, 32, device=dev), torch.randint(20, 101, (256,), device=dev)
    p = DiffPure(net, t_star=100, steps=100)
    p.purify(xs[:64], ts[:64], SampleNoise.from_ids(0, range(64)), width=64)
    torch.cuda.synchronize(); start = time.perf_counter()
    p.purify(xs, ts, SampleNoise.from_ids(0, range(256)), width=64); torch.cuda.synchronize()
    out["stream_256_width_64_seconds"] = time.perf_counter() - start
    out["stream_over_floor"] = out["stream_256_width_64_seconds"] / (int(ts.sum()) * out["seconds_per_evaluation"])
    out["join_over_floor"] = out["join_fp32_seconds"] / (int(t.sum()) * out["seconds_per_evaluation"])
    fast = torch.compile(net, dynamic=True)
    start = time.perf_counter(); DiffPure(fast, t_star=100, steps=100).purify(x, t, noise); torch.cuda.synchronize()
    out["compile_first_run_seconds"] = time.perf_counter() - start
    start = time.perf_counter(); DiffPure(fast, t_star=100, steps=100).purify(x, t, noise); torch.cuda.synchronize()
    out["join_fp32_compiled_seconds"] = time.perf_counter() - start
print(json.dumps(out, indent=2))
import os
open(os.path.join(os.environ.get("OUT", "benchmarks/results"), "gpu-latest.json"), "w").write(json.dumps(out, indent=2) + "\n")
PY
