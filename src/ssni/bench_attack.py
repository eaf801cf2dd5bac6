"""``ssni bench``'s attack rows: PGD+EOT through the demo's defenses, each setting in a fresh process
(for a clean peak RSS), against the floor ``--plan`` predicts."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from .runtime import CPU


ATTACK_SCRIPT = """
import json, resource, sys, time, torch
from ssni.attacks import PGD, ThreatModel
from ssni.checkpoints.registry import default_weights_dir, load_named
from ssni.data import load_split
from ssni.defense import SSNI, Defense
from ssni.evaluate.config import AttackConfig
from ssni.evaluate.costs import attack_cost, steps_per_sample
from ssni.evaluate.units import measure_units
from ssni.purifiers import DiffPure
from ssni.reweight import Calibration, make_reweight
steps, use_checkpoint, n, eot_batch, repeats, with_ssni = (int(v) for v in sys.argv[1:7])
device = torch.device(sys.argv[7])
w = default_weights_dir()
unet = load_named("mnist-unet", w).to(device)
ssni = SSNI(unet, make_reweight("sigmoid", Calibration.load(w / "mnist-unet.calibration.json")), n_levels=10)
defense = Defense(load_named("mnist-cnn", w).to(device), DiffPure(unet, t_star=300 if with_ssni else 150, steps=steps,
                  checkpoint=bool(use_checkpoint)), ssni if with_ssni else None).eval()
data = load_split("mnist-5k", "test").head(n)
data = data.to(device)
attack = PGD(ThreatModel("linf", 0.3), steps=2, step_size=0.05, eot=2, eot_batch=eot_batch)
attack(defense, data.images[:1], data.labels[:1])  # warm-up
best = float("inf")
for _ in range(repeats):
    start = time.perf_counter()
    attack(defense, data.images, data.labels, sample_ids=data.ids)
    best = min(best, time.perf_counter() - start)
u = measure_units(defense, data.images, n * eot_batch, n * eot_batch)
score, reverse = steps_per_sample(defense, data.images)
floor = attack_cost(AttackConfig("pgd", steps=2, eot=2), u, score, reverse, 1, bool(use_checkpoint))
print(json.dumps({"seconds_per_sample": best / n, "floor_seconds_per_sample": floor, "score_rows": score,
                  "reverse_steps_per_sample": reverse, "step_forward_backward_ms_per_row": 1e3 * u.step_grad,
                  "step_checkpointed_ms_per_row": 1e3 * u.step_ck, "step_forward_ms_per_row": 1e3 * u.step,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# (reverse steps, activation checkpointing, EOT draws stacked per pass, SSNI-N at t* = 300 = the demo's defense)
ATTACK_SETTINGS = ((10, False, 1, True), (10, True, 1, True), (10, False, 1, False), (10, True, 1, False),
                   (10, False, 2, False), (10, True, 2, False), (40, False, 1, False), (40, True, 1, False))


def attack_rows(n: int = 16, repeats: int = 1, settings=ATTACK_SETTINGS, device: torch.device = CPU) -> list[dict]:
    """PGD(2 steps) + EOT(2) through DiffPure (t* = 150), or through the demo's DiffPure (t* = 300)
    + SSNI-N, each setting in a fresh process for a clean peak RSS. The floor is the one ``--plan``
    predicts (:func:`ssni.evaluate.costs.attack_cost`): PGD steps x EOT x (score-norm rows + the
    samples' reverse steps) x one forward + backward per row (+ the recomputed forward under
    checkpointing) + the classifier, with units measured at the rows the attack's passes have."""
    rows = []
    for steps, use_checkpoint, eot_batch, with_ssni in settings:
        args = [str(v) for v in (steps, int(use_checkpoint), n, eot_batch, repeats, int(with_ssni), device)]
        done = subprocess.run([sys.executable, "-c", ATTACK_SCRIPT, *args], capture_output=True, text=True, check=True)
        row = {"defense": "DiffPure t*=300 + SSNI-N (demo)" if with_ssni else "DiffPure t*=150",
               "reverse_steps": steps, "checkpoint": use_checkpoint, "eot_batch": eot_batch, "n": n,
               **json.loads(done.stdout.strip().splitlines()[-1])}
        row["over_floor"] = row["seconds_per_sample"] / row["floor_seconds_per_sample"]
        rows.append(row)
    return rows
