#!/usr/bin/env bash
# GPU benchmarks in one go (about 5-8 minutes on one H200-class GPU), run from the repository root:
#   bash benchmarks/gpu.sh                    # results in $OUT if set, else benchmarks/results/
#   SSNI_GPU_SMOKE=1 bash benchmarks/gpu.sh   # the same steps on the CPU with tiny sizes (< 2 min): tests the script
# Steps: (1) per-sample noise, old per-row loop vs ssni.rng (benchmarks/noise.py); (2) purification throughput of a
# 35.7M DDPM UNet and the 106.6M DDPM++ deep network (random weights) at batch 64 and 128, fp32 and bf16;
# (3) host work per reverse step (a network returning zeros); (4) PGD+EOT against its floor, stacked EOT and
# checkpointing on/off; (5) `ssni evaluate --plan` for paper presets (random-init weights). See benchmarks/README.md.
set -uo pipefail
PY=${PY:-python3}  # the lent machine's python3 has CUDA torch, safetensors and tqdm and no network
if ! "$PY" -c "import torch, safetensors, tqdm" 2>/dev/null; then
    python3 -m venv .venv-gpu && .venv-gpu/bin/pip install --quiet torch==2.13.0 -e ".[test]" && PY=.venv-gpu/bin/python
fi
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
SMOKE=${SSNI_GPU_SMOKE:-0}
DEVICE=cuda; [ "$SMOKE" = 1 ] && DEVICE=cpu
STAMP=$(date -u +%Y-%m-%dT%H%M)
LOG="$RESULTS/gpu-$STAMP.log"
{ date -u; uptime; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; lscpu | grep 'Model name'; } \
    > "$LOG" 2>&1

echo "== 1. noise" | tee -a "$LOG"
if [ "$SMOKE" = 1 ]; then NOISE_ARGS="--reps 3 --devices cpu"; else NOISE_ARGS="--reps 100 --devices cuda"; fi
timeout 120 "$PY" benchmarks/noise.py $NOISE_ARGS --out "$RESULTS" >> "$LOG" 2>&1 || echo "noise step failed" | tee -a "$LOG"

echo "== 2-4. purification, host work, PGD+EOT floor" | tee -a "$LOG"
SMOKE=$SMOKE DEVICE=$DEVICE RESULTS=$RESULTS STAMP=$STAMP timeout 420 "$PY" - >> "$LOG" 2>&1 <<'PY' || echo "step 2-4 failed" | tee -a "$LOG"
import json, os, time, torch
from ssni.attacks import PGD, ThreatModel
from ssni.bench import host_overhead, machine
from ssni.classifiers import SmallCNN, SmallCNNConfig
from ssni.defense import Defense
from ssni.denoisers import UNet, UNetConfig
from ssni.denoisers.score_sde import ScoreSDEConfig, ScoreSDEEps, ScoreSDENet
from ssni.evaluate.plan import measure_units
from ssni.purifiers import DiffPure
from ssni.rng import SampleNoise

smoke, dev = os.environ["SMOKE"] == "1", torch.device(os.environ["DEVICE"])
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
batches, t_star, steps = ((2,), 4, 2) if smoke else ((64, 128), 100, 100)
out = {"machine": machine(), "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None, "smoke": smoke}
torch.manual_seed(0)
ddpm = UNet(UNetConfig(in_channels=3, base_channels=16 if smoke else 128, channel_mults=(1, 2, 2, 2),
                       blocks_per_level=1 if smoke else 2, attention=True)).to(dev).eval()
deep = ScoreSDEEps(ScoreSDENet(ScoreSDEConfig(nf=16, num_res_blocks=1) if smoke else ScoreSDEConfig())).to(dev).eval()
nets = {"ddpm_unet": ddpm, "ddpmpp_deep": deep}


def best(fn, k=3):
    fn(); sync(); b = float("inf")
    for _ in range(k):
        s = time.perf_counter(); fn(); sync(); b = min(b, time.perf_counter() - s)
    return b


rows = []
for name, net in nets.items():
    for b in batches:
        x, t = torch.rand(b, 3, 32, 32, device=dev), torch.randint(t_star // 5, t_star + 1, (b,), device=dev)
        noise, p = SampleNoise.from_ids(0, range(b)), DiffPure(net, t_star=t_star, steps=steps)
        for precision in ("fp32",) if smoke else ("fp32", "bf16"):
            with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
                s = best(lambda: p.purify(x, t, noise), 1)
                call = best(lambda: net(2 * x - 1, t))
            evals = int(t.clamp_max(steps).sum())
            rows.append({"net": name, "params_M": sum(q.numel() for q in net.parameters()) / 1e6, "batch": b,
                         "precision": precision, "seconds": s, "images_per_second": b / s,
                         "over_floor": s / (evals / b * call), "call_seconds": call})
            print(json.dumps(rows[-1]), flush=True)
out["purification"] = rows
out["host"] = [host_overhead((3, 32, 32), b, 10, t_star, net=ddpm, device=str(dev)) for b in batches]
print(json.dumps(out["host"]), flush=True)
classifier = SmallCNN(SmallCNNConfig(in_channels=3)).to(dev).eval()  # small on purpose: the defense's cost is the UNet
n, reverse = batches[0], 2 if smoke else 10
x, y = torch.rand(n, 3, 32, 32, device=dev), torch.randint(0, 10, (n,), device=dev)
attack_rows = []
for ck in (False, True):
    for eot_batch in (1,) if smoke else (1, 4):
        defense = Defense(classifier, DiffPure(ddpm, t_star=t_star, steps=reverse, checkpoint=ck)).eval()
        pgd = PGD(ThreatModel("linf", 8 / 255), steps=2, step_size=2 / 255, eot=4, eot_batch=eot_batch)
        s = best(lambda: pgd(defense, x, y), 1)
        u = measure_units(defense, x, n * eot_batch, n * eot_batch, 1 if smoke else 3)
        floor = 2 * 4 * (reverse * (u.step_ck if ck else u.step_grad) + u.classifier_grad) * n
        attack_rows.append({"checkpoint": ck, "eot_batch": eot_batch, "n": n, "reverse_steps": reverse,
                            "seconds_per_sample": s / n, "over_floor": s / floor,
                            "step_fwd_bwd_ms_per_row": 1e3 * u.step_grad, "step_ck_ms_per_row": 1e3 * u.step_ck,
                            "cuda_peak_bytes_per_row_step": u.cuda_step_peak_bytes})
        print(json.dumps(attack_rows[-1]), flush=True)
out["attack"] = attack_rows
path = os.path.join(os.environ["RESULTS"], f"gpu-{os.environ['STAMP']}{'-smoke' if smoke else ''}.json")
open(path, "w").write(json.dumps(out, indent=1) + "\n")
print("wrote", path)
PY

echo "== 5. evaluate --plan for presets" | tee -a "$LOG"
if [ "$SMOKE" = 1 ]; then
    PRESETS=${PLAN_PRESETS:-configs/mnist-diffpure-ssni-n.toml}; SETS="--set data.n=2 --set evaluate.batch_size=2"
else
    PRESETS=${PLAN_PRESETS:-"configs/cifar10-wrn28-diffpure-ssni-n-linf.toml configs/cifar10-wrn28-diffpure-base-linf.toml
        configs/cifar10-wrn28-gdmp-ssni-n-linf.toml configs/cifar10-wrn28-gns-ssni-n-linf.toml
        configs/cifar10-wrn70-diffpure-ssni-n-linf.toml configs/imagenet-resnet50-diffpure-ssni-n-linf.toml"}
    SETS=""
fi
for preset in $PRESETS; do
    echo "-- $preset" | tee -a "$LOG"
    PRESET=$preset DEVICE=$DEVICE SETS="$SETS" RESULTS=$RESULTS timeout 150 "$PY" - >> "$LOG" 2>&1 <<'PY' \
        || echo "plan failed: $preset" | tee -a "$LOG"
import json, os
from pathlib import Path
from ssni.evaluate.config import load_config
from ssni.evaluate.plan import format_plan, plan_run

sets = os.environ["SETS"].replace("--set ", "").split()
overrides = {k: (int(v) if v.isdigit() else v) for k, v in (s.split("=", 1) for s in sets)}
cfg = load_config(Path(os.environ["PRESET"]), {**overrides, "evaluate.device": os.environ["DEVICE"],
                                                "models.random_init": True})
plan = plan_run(cfg, probe=4)  # random weights: levels are guesses; ImageNet probes cost 100 rows per image
print(format_plan(plan))
name = Path(os.environ["PRESET"]).stem
Path(os.environ["RESULTS"], f"plan-{name}-{os.environ['DEVICE']}.json").write_text(json.dumps(plan, indent=1) + "\n")
PY
done
tail -n 80 "$LOG"
echo "log: $LOG"
