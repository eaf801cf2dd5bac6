"""Trace an attack on the first images of a config (docs/adaptive/README.md).

Usage: python docs/adaptive/trace.py CONFIG [--n 4] [--split test] [--set key=value ...] [--attr name=json ...]
       [--json OUT]

Runs the config's first attack as `ssni evaluate` does (same model, seed, attack draws and re-scoring
draws), recording every forward pass the attack makes. For the adaptive attack it prints, per image and per
candidate it exposes (``candidates``: the feasible-set output, then the unconstrained APGD output), the score
norm on one fresh draw against the target, the l_inf distance from the clean image, whether it is the clean
image, how many of the 8 re-scoring draws misclassify it, and, over the feasible-set run's forward passes,
the largest l_inf distance visited (overall and among passes whose score norm met the target) and the
share of passes whose score norm met the target. For every attack
it prints robust counts (worst / majority / single of the re-scoring draws) of the clean images, per candidate
and for the worst candidate per image, and for APGD how often its step was halved (docs/adaptive/README.md, issue 21 9c).
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


def robust_counts(preds: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """``preds: [N, B]``: robust under worst of N, majority (a strict plurality of the true class) and single."""
    correct = preds == y
    votes = torch.nn.functional.one_hot(preds, int(preds.max()) + 1 if preds.numel() else 1).sum(0)  # [B, C]
    mine = correct.sum(0)
    others = votes.scatter(1, y[:, None], 0).amax(1)
    return {"worst": int(correct.all(0).sum()), "majority": int((mine > others).sum()),
            "single": int(correct[0].sum()), "n": len(y)}


def halvings(attack) -> dict | None:
    """APGD's step-size record: how many checkpoints halved each sample's step (and the last step)."""
    trace = getattr(attack, "step_trace", None)
    if not trace or hasattr(attack, "e_target"):
        return None
    steps = torch.stack(trace)  # [iterations, B]
    halved = (steps[1:] < steps[:-1]).sum(0) + (steps[0] < attack.initial_step * attack.threat.eps).long()
    return {"halvings_mean": round(float(halved.float().mean()), 2), "halvings_max": int(halved.max()),
            "last_step_median": round(float(steps[-1].median()), 4)}


def image_rows(attack, x, y, ids, candidates, preds, norms, seen) -> list[dict]:
    rows = []
    for i in range(len(x)):
        row = {"id": int(ids[i]), "label": int(y[i]), "e_clean": round(float(norms[0][i]), 1),
               "e": [round(float(e[i]), 1) for e in norms[1:]],
               "linf": [round(float((c[i] - x[i]).abs().max()), 4) for c in candidates],
               "is_clean": [bool(torch.equal(c[i], x[i])) for c in candidates],
               "wrong_of_8": [int((preds[k, :, i] != y[i]).sum()) for k in range(len(candidates))]}
        if getattr(attack, "e_target", None) is not None:
            e_target = attack.e_target
            row |= {"e_target": round(float(e_target[i]), 1),
                    "run_max_linf": round(max(float(d[i]) for d, _ in seen), 4),
                    "run_max_linf_feasible": round(max([float(d[i]) for d, e in seen if e[i] <= e_target[i]] or [0]), 4),
                    "run_feasible_share": round(sum(float(e[i] <= e_target[i]) for _, e in seen) / len(seen), 2)}
        for name in ("levels", "feasible", "from_unconstrained"):
            value = getattr(attack, name, None)
            if isinstance(value, torch.Tensor):
                row[name] = value[..., i].tolist()
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--split", default=None)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--attr", action="append", default=[], help="set an attack attribute: unconstrained=false")
    ap.add_argument("--json", default=None, help="write the record here")
    args = ap.parse_args()
    overrides = {"data.n": args.n, **({"data.split": args.split} if args.split else {})}
    overrides |= {k: json.loads(v) if v[:1] in '0123456789-[{tf"' else v
                  for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(Path(args.config), overrides)
    model = prepare_model(cfg, default_weights_dir())
    attack, target = build_attack(cfg.attacks[0], model, cfg.evaluate.seed)
    for key, value in (s.split("=", 1) for s in args.attr):
        setattr(attack, key, json.loads(value))
    data = load_eval_data(cfg)
    x, y, ids = data.images, data.labels, data.ids
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, inputs, kwargs, output):  # (l_inf distance from the clean image, score norm) per pass
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
    with torch.no_grad():
        norms = [model.explain(c, ids, draw=10**9)["score_norm"] for c in [x, *candidates]]
    a = cfg.attacks[0]
    run_calls = a.restarts * (a.steps + 1) * -(-a.eot // getattr(attack, "eot_batch", 1))  # the first run(s)
    rows = image_rows(attack, x, y, ids, candidates, preds, norms, calls[:run_calls])
    for row in rows:
        print(json.dumps(row))
    worst = (preds == y).sum(1).argmin(0)  # the runner's choice: fewest correct draws, first on ties
    clean = fresh_predictions(model, x, ids, cfg.evaluate.rescore_draws)  # the clean images, same draws
    summary = {"clean": robust_counts(clean, y), "candidates": [robust_counts(p, y) for p in preds],
               "worst_candidate": robust_counts(preds[worst, :, torch.arange(len(y))].T, y),
               "first_candidate_is_clean": sum(r["is_clean"][0] for r in rows), "forward_passes": len(calls),
               "apgd_steps": halvings(attack)}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "images": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
