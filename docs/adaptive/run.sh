#!/bin/bash
# Does an SSNI-aware attack beat PGD/APGD on the demo defense? Each attack alone, 32 images of one split,
# one thread per job; the two splits run side by side. Usage: bash docs/adaptive/run.sh val|test OUT_ROOT
set -euo pipefail
split=$1; root=$2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for a in pgd apgd adaptive transfer; do
  echo "=== $a $split start $(date -u +%T)"
  /usr/bin/time -f "%e s wall" ssni evaluate --config docs/adaptive/$a.toml --out "$root/$split-$a" \
    --set data.split=$split --limit 32 --no-progress
  echo "=== $a $split end $(date -u +%T)"
done
