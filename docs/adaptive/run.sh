#!/bin/bash
# Does an SSNI-aware attack beat PGD/APGD on the demo defense? Each attack alone, 32 images of one split, one
# thread. Usage: bash docs/adaptive/run.sh val|test OUT_ROOT [ATTACK ...]   (default: all four, then the trace)
# "trace" reruns the adaptive attack through docs/adaptive/trace.py: its two candidates scored separately.
set -euo pipefail
split=$1; root=$2; shift 2
jobs=("${@:-pgd apgd adaptive transfer trace}")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
here=$(dirname "$0")
for a in ${jobs[@]}; do
  echo "=== $a $split start $(date -u +%T)"
  if [ "$a" = trace ]; then
    /usr/bin/time -f "%e s wall" python "$here/trace.py" "$here/adaptive.toml" --split "$split" --n 32 \
      --json "$root/$split-adaptive-trace.json" > "$root/$split-adaptive-trace.log"
  else
    /usr/bin/time -f "%e s wall" ssni evaluate --config "$here/$a.toml" --out "$root/$split-$a" \
      --set data.split="$split" --limit 32 --no-progress
  fi
  echo "=== $a $split end $(date -u +%T)"
done
