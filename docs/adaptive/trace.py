"""Trace the adaptive attack on the first images of a config (docs/adaptive/README.md, "4 traced images").

Usage: python docs/adaptive/trace.py docs/adaptive/adaptive.toml [--n 4] [--split test] [--set key=value ...]

Runs the config's first attack as `ssni evaluate` does (same model, seed and attack draws), records every
forward pass the attack makes (l_inf distance of the input from the clean image, score norm), then prints,
per image and per candidate the attack exposes (``candidates``: the feasible-set output, then the unconstrained
APGD output; an attack without candidates: its output), the score norm on one fresh draw against the target,
the l_inf distance from the clean image, whether it is the clean image, and how many of the 8 fresh
re-scoring draws misclassify it; and, over the forward passes of the feasible-set run, the largest l_inf
distance visited and the share of passes whose score norm met the target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ssni.checkpoints.registry import default_weights_dir
from ssni.evaluate import load_config
from ssni.evaluate.build import build_attack, load_eval_data
from ssni.evaluate.runner import ATTACK_DRAW, fresh_predictions, prepare_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--split", default=None)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--json", default=None, help="write the per-image record here")
    args = ap.parse_args()
    overrides = {"data.n": args.n, **({"data.split": args.split} if args.split else {})}
    overrides |= {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v
                  for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(Path(args.config), overrides)
    model = prepare_model(cfg, default_weights_dir())
    attack, target = build_attack(cfg.attacks[0], model, cfg.evaluate.seed)
    data = load_eval_data(cfg)
    x, y, ids = data.images, data.labels, data.ids
    calls: list[tuple[float, ...]] = []

    def record(module, inputs, kwargs, output):
        if isinstance(output, tuple) and output[1] is not None:
            xi = inputs[0].detach()
            k = xi.shape[0] // len(x)
            dist = (xi - x.repeat(k, 1, 1, 1)).flatten(1).abs().amax(1).reshape(k, -1).amax(0)
            calls.append((dist, output[1].detach().reshape(k, -1).mean(0)))

    model.register_forward_hook(record, with_kwargs=True)
    model.draw = ATTACK_DRAW
    x_adv = attack(target, x, y, sample_ids=ids)
    candidates = getattr(attack, "candidates", None) or [x_adv]
    preds = torch.stack([fresh_predictions(model, c, ids, cfg.evaluate.rescore_draws) for c in candidates])
    e_target = attack.e_target
    with torch.no_grad():
        norms = [model.explain(c, ids, draw=10**9)["score_norm"] for c in [x, *candidates]]
    a = cfg.attacks[0]
    run_calls = a.restarts * (a.steps + 1) * -(-a.eot // attack.eot_batch)  # the feasible-set run(s)
    seen = calls[:run_calls]
    rows = []
    for i in range(len(x)):
        row = {"id": int(ids[i]), "label": int(y[i]), "e_target": round(float(e_target[i]), 1),
               "e_clean": round(float(norms[0][i]), 1), "e": [round(float(e[i]), 1) for e in norms[1:]],
               "linf": [round(float((c[i] - x[i]).abs().max()), 4) for c in candidates],
               "is_clean": [bool(torch.equal(c[i], x[i])) for c in candidates],
               "wrong_of_8": [int((preds[k, :, i] != y[i]).sum()) for k in range(len(candidates))],
               "run_max_linf": round(max(float(d[i]) for d, _ in seen), 4),
               "run_feasible_share": round(sum(float(e[i] <= e_target[i]) for _, e in seen) / len(seen), 2)}
        for name in ("levels", "feasible", "from_unconstrained"):
            value = getattr(attack, name, None)
            if isinstance(value, torch.Tensor):
                row[name] = value[..., i].tolist()
        rows.append(row)
        print(json.dumps(row))
    print(f"forward passes: {len(calls)} ({run_calls} in the feasible-set run); first candidate equal to the "
          f"clean image: {sum(r['is_clean'][0] for r in rows)}/{len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
