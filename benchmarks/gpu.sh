#!/usr/bin/env bash
# Everything a lent GPU machine should check and measure, in one call of about 8 minutes on one H100:
#   bash benchmarks/gpu.sh                    # results in benchmarks/results/gpu, or with $OUT set: $OUT/gpu.tar.gz
#   SSNI_GPU_SMOKE=1 bash benchmarks/gpu.sh   # every step at tiny sizes on the CPU: checks the script, not a GPU
# Steps, each under its own time limit, each writing its own files, so a failed step loses nothing else:
#   1. the test suite on CUDA (tests/test_devices.py runs every command on cuda and compares with the CPU)
#   2. ssni demo --device cuda: wall time of the quick and the full demo
#   3. precision modes fp32 / tf32 / bf16 against CPU fp32 on 200 MNIST test images (benchmarks/precision.py)
#   4. DDPM++ deep per row: forward and forward+backward TFLOP/s, eager / channels_last / compiled / CUDA graphs
#   5. purification: join-when-due vs the authors' scheme, one at a time, diffusers' loop (batch 64, 128)
#   6. PGD+EOT against its floor, checkpointing and stacked EOT where they fit
#   7. the CIFAR-10 DiffPure + SSNI-N row's --plan ("auto") beside a measured 16-image slice of it
# On the lent machine (no network) bring mlxtend and diffusers as wheels in .whl (see ../shared/GPU.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
SMOKE=${SSNI_GPU_SMOKE:-0}
RESULTS=${OUT:+/tmp/ssni-gpu/gpu}  # the device tool brings back few files from $OUT: one archive, the log, the status
RESULTS=${RESULTS:-benchmarks/results/gpu}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu.log"
STATUS="$RESULTS/steps.tsv"
{ date -u; uptime; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$LOG" 2>&1
printf "step\tstatus\tseconds\n" > "$STATUS"
if [ "$SMOKE" = 1 ]; then SMOKE_FLAG=--smoke; LIMIT_SCALE=${LIMIT_SCALE:-10}; else SMOKE_FLAG=; fi

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, log, record status and wall time; never stop the script
    local name=$1 limit=$(( $2 * ${LIMIT_SCALE:-1} )); shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    printf "%s\t%s\t%s\n" "$name" "$([ $rc = 0 ] && echo ok || echo "failed rc=$rc")" "$((SECONDS - start))" \
        | tee -a "$STATUS"
}

if [ "$SMOKE" = 1 ]; then
    step tests 30 "$PY" -m pytest tests/test_devices.py tests/test_runtime.py -q -x -p no:cacheprovider
    step demo-quick 30 "$PY" -m ssni.cli demo --device cpu --n-test 2 --pgd-steps 1 --eot 1 --draws 2 \
        --out "$RESULTS/demo-quick"
    step precision 30 "$PY" benchmarks/precision.py --device cpu --modes fp32 --n 2 --steps 1 --out "$RESULTS" \
        --write-reference "$RESULTS/precision-smoke-reference.json"
else
    WORKERS=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    step tests 110 "$PY" -m pytest tests -q -x -p no:cacheprovider $WORKERS --junitxml="$RESULTS/tests.xml"
    step demo-quick 50 "$PY" -m ssni.cli demo --device cuda --quick --out "$RESULTS/demo-quick"
    step demo-full 120 "$PY" -m ssni.cli demo --device cuda --out "$RESULTS/demo-full"
    step precision 80 "$PY" benchmarks/precision.py --device cuda --n 200 --out "$RESULTS" \
        --reference benchmarks/results/precision-cpu-fp32.json
fi
step roofline 70 "$PY" benchmarks/gpu_bench.py roofline --out "$RESULTS" $SMOKE_FLAG
step purify 35 "$PY" benchmarks/gpu_bench.py purify --out "$RESULTS" $SMOKE_FLAG
step attack 35 "$PY" benchmarks/gpu_bench.py attack --out "$RESULTS" $SMOKE_FLAG
step paper-slice 70 "$PY" benchmarks/gpu_bench.py slice --out "$RESULTS" $SMOKE_FLAG
cat "$STATUS"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && tar -czf "$OUT/gpu.tar.gz" --exclude='*.sqlite' -C "$(dirname "$RESULTS")" gpu \
        && cp "$LOG" "$STATUS" "$OUT"/ && echo "wrote $OUT/gpu.tar.gz (stores left out; tables, JSON and plots in)"
fi
