#!/bin/bash
# one run at a time, 1 thread
cd /tmp/conv/tree; export PYTHONPATH=/tmp/conv/tree/src
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
C=configs/mnist-diffpure-ssni-n.toml
L="${LADDER:-steps=10}"
run() { local name=$1; shift; echo "=== $name start $(date -u +%T)"; /usr/bin/time -f "%e s wall" /work/main/.venv/bin/python -m ssni.cli converge --config $C --limit 32 --no-progress --ladder "$L" "$@"; echo "=== $name end $(date -u +%T)"; }
for job in $JOBS; do
  case $job in
    n-pgd) run n-pgd --out /tmp/conv/ssni-n-pgd --attack pgd --label "DiffPure + SSNI-N" ;;
    d-pgd) run d-pgd --out /tmp/conv/diffpure-pgd --attack pgd --set ssni.reweight=none --label "DiffPure" ;;
    n-apgd) run n-apgd --out /tmp/conv/ssni-n-apgd --attack apgd --label "DiffPure + SSNI-N" ;;
    d-apgd) run d-apgd --out /tmp/conv/diffpure-apgd --attack apgd --set ssni.reweight=none --label "DiffPure" ;;
  esac
done

# Round 2 (the demo budget raised to 20 steps): the same studies as a cross through steps 20 / EOT 2,
# i.e. the EOT axis measured again at 20 steps; budget points already measured are reused from their folders.
#   L="steps=5,10,20,40 eot=1,2,4"
#   ssni converge --config $C --limit 32 --no-progress --ladder "$L" --set attacks.0.steps=20 \
#       --out /tmp/conv/ssni-n-pgd20 --attack pgd --label "DiffPure + SSNI-N"
#   ssni converge --config $C --limit 32 --no-progress --ladder "$L" --set attacks.0.steps=20 \
#       --set ssni.reweight=none --out /tmp/conv/diffpure-pgd20 --attack pgd --label "DiffPure"
# then: python docs/convergence/combine.py docs/convergence /tmp/conv/ssni-n-pgd20 /tmp/conv/diffpure-pgd20 \
#   /tmp/conv/ssni-n-pgd /tmp/conv/diffpure-pgd /tmp/conv/ssni-n-apgd /tmp/conv/diffpure-apgd
# (the first-round pgd studies relabelled "..., base steps 10": their EOT axis at 10 steps is kept)
