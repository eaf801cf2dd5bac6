"""The main job: SSNI on real MNIST with the shipped models, clean and under PGD+EOT.

For each method (undefended, DiffPure at its constant ``t*``, DiffPure + SSNI-L,
DiffPure + SSNI-N; with ``all_methods`` also GDMP and GNS with and without
SSNI-N) the demo measures clean accuracy on one fresh draw of the defense's
randomness, then attacks the defense with PGD+EOT through exact gradients (the
whole chain, SSNI's score norm and relaxed levels included) and re-scores the
adversarial examples on a fresh draw. Defaults were chosen on the validation
split (see docs/demo.md); the test split is only evaluated.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .attacks import PGD, ThreatModel
from .checkpoints.registry import default_weights_dir, load_manifest, load_named
from .data import ImageSet, load_split
from .errors import CheckpointError
from .defense import SSNI, Defense
from .diffusion import VPSchedule, forward_jump, to_image_scale, to_model_scale
from .metrics import auroc, wilson_interval
from .purifiers import GDMP, GNS, DiffPure
from .report import format_table, image_grid, level_histogram, score_norm_histogram
from .reweight import Calibration, make_reweight
from .rng import SampleNoise
from .score_norm import score_norm_nograd

MODEL_PREFIX = {"mnist-5k": "mnist", "fashion-mnist": "fashion-mnist"}


def model_names(dataset: str) -> tuple[str, str]:
    """Manifest names of the dataset's ``(diffusion model, classifier)``."""
    prefix = MODEL_PREFIX.get(dataset, dataset)
    return f"{prefix}-unet", f"{prefix}-cnn"


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of a demo run (written to results.json)."""

    dataset: str = "mnist-5k"
    split: str = "test"
    n_test: int = 200
    t_star: int = 150
    steps: int = 10
    n_levels: int = 10
    bias: int = 5
    tau: float | None = None
    calibration_size: int = 1000
    eps: float = 0.3
    pgd_steps: int = 20
    step_size: float = 0.05
    eot: int = 2
    batch_size: int = 100
    seed: int = 0
    all_methods: bool = False
    gns_votes: int = 3


QUICK = {"n_test": 64, "pgd_steps": 10}


def calibration(unet: nn.Module, train: ImageSet, cfg: DemoConfig, weights_dir: Path) -> Calibration:
    """Load the shipped reference statistics if they match this setup, else compute them."""
    sha = load_manifest(weights_dir).get(model_names(cfg.dataset)[0], {}).get("sha256")
    meta = {"score_model_sha256": sha, "n_levels": cfg.n_levels, "n_images": cfg.calibration_size,
            "split": f"{cfg.dataset}/train", "seed": cfg.seed}
    path = weights_dir / f"{MODEL_PREFIX.get(cfg.dataset, cfg.dataset)}-calibration.json"
    if path.is_file():
        shipped = Calibration.load(path)
        if shipped.meta == meta:
            return shipped
    ref = train.head(cfg.calibration_size)
    norms = torch.cat([score_norm_nograd(unet, VPSchedule(), ref.images[i:i + 500],
                                         SampleNoise.from_ids(cfg.seed, ref.ids[i:i + 500]), cfg.n_levels)
                       for i in range(0, len(ref), 500)])
    return Calibration.fit(norms, **meta)


def build_methods(cfg: DemoConfig, unet: nn.Module, classifier: nn.Module, cal: Calibration) -> dict:
    """Name -> (model, ssni kind or None). ``model`` is the classifier or a :class:`Defense`."""

    def ssni(kind: str) -> SSNI:
        return SSNI(unet, make_reweight(kind, cal, tau=cfg.tau, bias=cfg.bias), n_levels=cfg.n_levels)

    def diffpure() -> DiffPure:
        return DiffPure(unet, t_star=cfg.t_star, steps=cfg.steps, checkpoint=True)

    methods = {"undefended": (classifier, None),
               "DiffPure": (Defense(classifier, diffpure(), seed=cfg.seed), None),
               "DiffPure + SSNI-L": (Defense(classifier, diffpure(), ssni("linear"), seed=cfg.seed), "linear"),
               "DiffPure + SSNI-N": (Defense(classifier, diffpure(), ssni("sigmoid"), seed=cfg.seed), "sigmoid")}
    if cfg.all_methods:
        gdmp = GDMP(unet, t_star=cfg.t_star // 2, rounds=2, steps=cfg.steps // 2, checkpoint=True)
        gns = GNS(unet, levels=(cfg.t_star // 3, cfg.t_star // 2, cfg.t_star), steps=cfg.steps // 2,
                  checkpoint=True)
        for name, purifier in (("GDMP", gdmp), ("GNS", gns)):
            votes = cfg.gns_votes if name == "GNS" else 1
            methods[name] = (Defense(classifier, purifier, seed=cfg.seed, votes=votes), None)
            methods[f"{name} + SSNI-N"] = (Defense(classifier, purifier, ssni("sigmoid"), seed=cfg.seed,
                                                   votes=votes), "sigmoid")
    return methods


def predict(model: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.predict(x, sample_ids=ids) if isinstance(model, Defense) else model(x).argmax(1)


def evaluate_method(model: nn.Module, test: ImageSet, attack: PGD, cfg: DemoConfig) -> tuple[dict, Tensor]:
    """Clean and robust accuracy (each on a fresh draw), levels on clean inputs, adversarial examples."""
    start = time.time()
    clean_ok, robust_ok, levels, adversarial = [], [], [], []
    for i in range(0, len(test), cfg.batch_size):
        x, y, ids = (t[i:i + cfg.batch_size] for t in (test.images, test.labels, test.ids))
        clean_ok.append(predict(model, x, ids) == y)
        if isinstance(model, Defense):
            levels.append(model.explain(x, sample_ids=ids)["t_star"][-1].float())
        x_adv = attack(model, x, y, sample_ids=ids if isinstance(model, Defense) else None)
        adversarial.append(x_adv)
        robust_ok.append(predict(model, x_adv, ids) == y)
    t = torch.cat(levels) if levels else torch.zeros(len(test))
    clean, robust = torch.cat(clean_ok), torch.cat(robust_ok)
    row = {"clean_acc": clean.float().mean().item(), "robust_acc": robust.float().mean().item(),
           "clean_ci95": wilson_interval(int(clean.sum()), len(clean)),
           "robust_ci95": wilson_interval(int(robust.sum()), len(robust)),
           "t_mean": t.mean().item(), "t_std": t.std().item() if len(t) > 1 else 0.0,
           "seconds": time.time() - start}
    return row, torch.cat(adversarial)


def run_demo(cfg: DemoConfig, out: Path, weights_dir: Path | None = None, progress: bool = True) -> dict:
    """Run the demo, write results.json and figures into ``out``, return the results."""
    weights_dir = Path(weights_dir or default_weights_dir())
    out.mkdir(parents=True, exist_ok=True)
    missing = [n for n in model_names(cfg.dataset) if n not in load_manifest(weights_dir)]
    if missing:
        raise CheckpointError(f"{weights_dir} has no {' or '.join(missing)} for {cfg.dataset}; train them with "
                              f"`ssni train score --dataset {cfg.dataset} --name {model_names(cfg.dataset)[0]}` and "
                              f"`ssni train classifier --dataset {cfg.dataset} --name {model_names(cfg.dataset)[1]}`")
    unet, classifier = (load_named(name, weights_dir) for name in model_names(cfg.dataset))
    test = load_split(cfg.dataset, cfg.split).head(cfg.n_test)
    cal = calibration(unet, load_split(cfg.dataset, "train"), cfg, weights_dir)
    cal.save(out / "calibration.json")
    attack = PGD(ThreatModel("linf", cfg.eps), steps=cfg.pgd_steps, step_size=cfg.step_size, eot=cfg.eot)
    rows, adversarial = [], {}
    methods = build_methods(cfg, unet, classifier, cal)
    for name, (model, kind) in tqdm(methods.items(), desc="methods", disable=not progress):
        row, adversarial[name] = evaluate_method(model, test, attack, cfg)
        rows.append({"method": name, "ssni": kind, **row})
        if progress:
            tqdm.write(f"{name}: clean {row['clean_acc']:.3f}, robust {row['robust_acc']:.3f} "
                       f"({row['seconds']:.0f} s)")
    results = {"dataset": cfg.dataset, "split": cfg.split, "n_test": len(test), "config": asdict(cfg),
               "attack": {"name": "PGD+EOT", "gradients": "exact (through the whole defense)",
                          "norm": "linf", "eps": cfg.eps, "steps": cfg.pgd_steps,
                          "step_size": cfg.step_size, "eot": cfg.eot, "random_start": False,
                          "scoring": "one evaluation on fresh randomness after the attack"},
               "calibration": asdict(cal), "rows": rows}
    results.update(figures(methods, test, adversarial, cal, cfg, out))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.txt").write_text(format_table(rows) + "\n")
    return results


def figures(methods: dict, test: ImageSet, adversarial: dict, cal: Calibration, cfg: DemoConfig,
            out: Path) -> dict:
    """Score-norm histogram (clean vs adversarial vs DiffPure), level histogram, image grid."""
    defense, _ = methods["DiffPure + SSNI-N"]
    x_adv = adversarial["DiffPure"]
    noise = SampleNoise.from_ids(cfg.seed + 1, test.ids)
    unet = defense.ssni.score_model
    e_clean = score_norm_nograd(unet, VPSchedule(), test.images, noise, cfg.n_levels)
    e_adv = score_norm_nograd(unet, VPSchedule(), x_adv, noise, cfg.n_levels)
    score = auroc(e_clean, e_adv)
    score_norm_histogram(e_clean, e_adv, score, out / "score_norms.png")
    levels = {name: m.explain(test.images, sample_ids=test.ids, draw=0)["t_star"][-1]
              for name, (m, kind) in methods.items() if kind is not None and name.startswith("DiffPure")}
    level_histogram(levels, out / "t_star.png")
    k = min(8, len(test))
    t = defense.explain(x_adv[:k], sample_ids=test.ids[:k], draw=0)["t_star"][0]
    rows_noise = SampleNoise.from_ids(cfg.seed, test.ids[:k])
    noised = forward_jump(VPSchedule(), to_model_scale(x_adv[:k]), t, rows_noise.randn(("forward", 0), x_adv[:k]))
    with torch.no_grad():
        purified = defense.purify(x_adv[:k], sample_ids=test.ids[:k], draw=0)[0]
    image_grid({"clean": test.images[:k], "adversarial (vs DiffPure)": x_adv[:k],
                "noised at SSNI-N t*": to_image_scale(noised), "purified": purified}, out / "purification.png")
    return {"auroc_score_norm": score, "auroc_adversarial_source": "PGD+EOT against DiffPure",
            "score_norm_clean_mean": e_clean.mean().item(), "score_norm_adversarial_mean": e_adv.mean().item()}


def demo_config(quick: bool, **overrides) -> DemoConfig:
    cfg = replace(DemoConfig(), **QUICK) if quick else DemoConfig()
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
