"""Choose the demo's defaults on the validation split (never the test split).

For each base level t*, evaluates DiffPure, DiffPure + SSNI-L and DiffPure + SSNI-N on the
first N validation images: clean accuracy and robust accuracy under PGD+EOT with exact
gradients. Writes one results.json per setting under OUT and prints a table.

    python scripts/validate_demo.py --out out/validation --n 64 --t-stars 100 150 200
"""

import argparse
from pathlib import Path

from ssni.demo import demo_config, run_demo
from ssni.report import format_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("out/validation"))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--t-stars", type=int, nargs="+", default=[100, 150, 200])
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--eot", type=int, default=1)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--n-levels", type=int, default=None)
    args = parser.parse_args()
    for t_star in args.t_stars:
        cfg = demo_config(False, split="val", n_test=args.n, t_star=t_star, pgd_steps=args.pgd_steps, eot=args.eot,
                          eps=args.eps, tau=args.tau, n_levels=args.n_levels)
        tag = f"t{t_star}-eps{args.eps}-tau{args.tau}-N{cfg.n_levels}"
        results = run_demo(cfg, args.out / tag, progress=False)
        print(f"== {tag}: score-norm AUROC {results['auroc_score_norm']:.3f}")
        print(format_table(results["rows"]), flush=True)


if __name__ == "__main__":
    main()
