"""Precision modes against CPU fp32 on the same MNIST test images: the README's precision table.

    # once, on a CPU (the reference; about 45 min at one thread for 200 images):
    python benchmarks/precision.py --device cpu --modes fp32 --write-reference benchmarks/results/precision-cpu-fp32.json
    # on the GPU (benchmarks/gpu.sh runs this):
    python benchmarks/precision.py --device cuda --reference benchmarks/results/precision-cpu-fp32.json --out DIR

Each mode runs the demo's DiffPure + SSNI-N experiment (configs/mnist-diffpure-ssni-n.toml: clean pass,
PGD-40 x EOT-2 with exact gradients, 8 fresh re-scoring draws) on the device at that precision, and is
compared sample by sample with the reference rows: score-norm relative error, clean t* and prediction
agreement, and the worst / majority / single verdicts of the attack (on samples attacked on both sides).
The purified-image error is one purification (draw 0) of the first 64 images against the CPU's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist-diffpure-ssni-n.toml"
PROTOCOLS = ("worst", "majority", "single")


def run_rows(device: str, precision: str, n: int, out: Path, steps: int | None = None) -> tuple[list[dict], float]:
    """Per-sample rows of the experiment on ``device`` at ``precision`` (resumed from ``out`` if it holds
    part of the run; ``steps`` cuts the attack, for a smoke run), and its wall time."""
    from ssni.evaluate import evaluate, load_config

    cut = {} if steps is None else {"attacks.0.steps": steps, "attacks.0.eot": 1, "evaluate.rescore_draws": 2}
    cfg = load_config(CONFIG, {"data.n": n, "evaluate.device": device, "evaluate.precision": precision, **cut})
    start = time.perf_counter()
    evaluate(cfg, out, progress=False)
    return read_rows(out, cfg), time.perf_counter() - start


def read_rows(out: Path, cfg) -> list[dict]:
    """The fields the comparison needs, per sample, from a run folder."""
    from ssni.evaluate.store import Store

    store = Store(out / "results.sqlite", cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    rows = [{"sample_id": r["sample_id"], "score_norm": r["score_norm"], "t_star": r["t_star"],
             "clean_pred": r["clean_pred"], "clean_correct": r["clean_correct"],
             "attacks": {k: {p: a[p] for p in PROTOCOLS} for k, a in r["attacks"].items()}} for r in store.rows()]
    store.close()
    return rows


def compare(rows: list[dict], reference: list[dict]) -> dict:
    """Agreement of ``rows`` with the reference rows, sample by sample."""
    ref = {r["sample_id"]: r for r in reference}
    pairs = [(r, ref[r["sample_id"]]) for r in rows if r["sample_id"] in ref]
    rel = torch.tensor([abs(a["score_norm"] - b["score_norm"]) / abs(b["score_norm"]) for a, b in pairs])
    both = [(a["attacks"], b["attacks"]) for a, b in pairs if a["attacks"] and b["attacks"]]
    verdicts = {p: sum(all(x[k][p] == y[k][p] for k in x) for x, y in both) for p in PROTOCOLS}
    return {"n": len(pairs), "score_norm_rel_error_median": float(rel.median()), "score_norm_rel_error_max": float(rel.max()),
            "t_star_equal": sum(a["t_star"] == b["t_star"] for a, b in pairs),
            "clean_pred_equal": sum(a["clean_pred"] == b["clean_pred"] for a, b in pairs),
            "attacked_on_both": len(both), **{f"{p}_verdict_equal": v for p, v in verdicts.items()}}


def purified_error(device: str, precision: str, n: int = 64) -> dict:
    """Mean and largest |difference| of one purification (draw 0) on ``device`` at ``precision`` vs CPU fp32."""
    from ssni.evaluate import load_config
    from ssni.evaluate.build import load_eval_data
    from ssni.evaluate.runner import precision as precision_of, prepare_model
    from ssni.checkpoints.registry import default_weights_dir

    outs = {}
    for dev, prec in (("cpu", "fp32"), (device, precision)):
        cfg = load_config(CONFIG, {"data.n": n, "evaluate.device": dev, "evaluate.precision": prec})
        data = load_eval_data(cfg).to(torch.device(dev))
        with precision_of(cfg), torch.no_grad():
            model = prepare_model(cfg, default_weights_dir())
            outs[dev, prec] = model.purify(data.images, sample_ids=data.ids, draw=0)[0].float().cpu()
    diff = (outs[device, precision] - outs["cpu", "fp32"]).abs()
    return {"purified_mean_abs_diff": float(diff.mean()), "purified_max_abs_diff": float(diff.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="fp32,tf32,bf16")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, help="PGD steps (smoke runs only: EOT 1, 2 draws; not a measurement)")
    parser.add_argument("--reference", type=Path, help="rows written by --write-reference (CPU fp32)")
    parser.add_argument("--write-reference", type=Path, help="write this run's rows as the reference")
    parser.add_argument("--store", type=Path, help="with --write-reference: a finished run folder of the same "
                        "experiment (ssni evaluate --config configs/mnist-diffpure-ssni-n.toml) to take the rows from")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    from ssni.bench import machine
    from ssni.runtime import resolve_device

    device = resolve_device(args.device)
    reference = json.loads(args.reference.read_text()) if args.reference else None
    results = {"machine": machine(device), "n": args.n, "config": str(CONFIG.name), "modes": {}}
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows, seconds = run_rows(str(device), mode, args.n, args.store or Path(tmp), args.steps)
        entry = {"seconds": seconds}
        if args.write_reference:
            args.write_reference.parent.mkdir(parents=True, exist_ok=True)
            args.write_reference.write_text(json.dumps({"machine": results["machine"], "rows": rows}) + "\n")
        if reference is not None:
            entry.update(compare(rows, reference["rows"]), **purified_error(str(device), mode))
            entry["reference_machine"] = reference["machine"]
        results["modes"][mode] = entry
        print(mode, json.dumps(entry), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"precision-{device.type}-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
