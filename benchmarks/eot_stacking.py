"""EOT draws one per pass vs stacked (eot_batch): time and identical adversarial examples.

Run from the repository root: python benchmarks/eot_stacking.py (about a minute on 2 CPU cores).
"""
import time
from ssni.attacks import PGD, ThreatModel
from ssni.checkpoints.registry import default_weights_dir, load_named
from ssni.data import load_split
from ssni.defense import Defense
from ssni.purifiers import DiffPure
w = default_weights_dir()
data = load_split("mnist-5k", "test").head(16)
for eb in (1, 4, 1, 4):
    defense = Defense(load_named("mnist-cnn", w), DiffPure(load_named("mnist-unet", w), t_star=150, steps=10, checkpoint=True))
    s = time.perf_counter()
    x = PGD(ThreatModel("linf", 0.3), steps=2, step_size=0.05, eot=4, eot_batch=eb)(defense, data.images, data.labels)
    print(eb, round(time.perf_counter() - s, 2), "s", float(x.sum()))
