#!/bin/bash
# The frontier experiment of issue 22 on MNIST (CPU, one thread per job, one job at a time).
# Usage: bash docs/frontier/run.sh val|plan|test|test40|repro   (each step resumes where it stopped)
set -euo pipefail
cd "$(dirname "$0")/../.."
S=docs/frontier
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
CONFIGS="--config $S/diffpure.toml --config $S/ssni-n.toml --config $S/ssni-l.toml"
LEVELS="--grid purifier.diffpure.t_star=50,100,150,200,250,300 --grid ssni-n,ssni-l:purifier.diffpure.t_star=150,300"
EPS="--grid attacks.0.eps+attacks.0.step_size=0.15+0.025,0.3+0.05"  # step = eps / 6, the demo's 0.05 at 0.3
N=${N:-200}
case $1 in
  # 1. eps on the validation split: DiffPure at t* = 300, 48 images
  val) ssni sweep --config $S/diffpure.toml --set data.split=val --limit 48 --out runs/frontier-val-eps --no-progress \
         --grid attacks.0.eps+attacks.0.step_size=0.05+0.0083,0.1+0.0167,0.15+0.025,0.2+0.0333 ;;
  # 2. the plan of the test sweep
  plan) ssni sweep $CONFIGS $LEVELS $EPS --limit $N --out runs/frontier-test --plan ;;
  # 3. the test sweep, our protocol (exact gradients, worst of 8 headline)
  test) ssni sweep $CONFIGS $LEVELS $EPS --limit $N --out runs/frontier-test --no-progress ;;
  # 3b. eps 0.15 again at the budget the paired convergence rule chose for the demo (PGD 40 steps, docs/convergence)
  test40) ssni sweep $CONFIGS $LEVELS --grid attacks.0.eps+attacks.0.step_size=0.15+0.025 --set attacks.0.steps=40 \
            --limit $N --out runs/frontier-test-40 --no-progress ;;
  # 4. the paper's protocol (surrogate gradients of a 2-step chain, single-draw headline, reference quirks)
  repro) ssni sweep --config $S/repro/diffpure.toml --config $S/repro/ssni-n.toml --config $S/repro/ssni-l.toml \
           $LEVELS $EPS --limit $N --out runs/frontier-repro --protocol single --no-progress ;;
esac
