#!/usr/bin/env bash
# Run on a lent GPU machine from the repository root: records GPU timings of the benchmark suite.
# Not yet run (no GPU was lent to the session that wrote it); see benchmarks/README.md.
set -euo pipefail
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install --quiet torch==2.13.0 -e ".[test]"
.venv-gpu/bin/python - <<'PY'
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
print(json.dumps(out, indent=2))
open("benchmarks/results/gpu-latest.json", "w").write(json.dumps(out, indent=2) + "\n")
PY
