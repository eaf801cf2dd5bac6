"""From an :class:`ExperimentConfig` to models and attacks (one place for both the demo and evaluate)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..attacks import PGD, ThreatModel
from ..attacks.adaptive import AdaptivePGD
from ..attacks.autoattack import AutoAttackRand
from ..attacks.bpda import BPDA
from ..checkpoints.public import PUBLIC, load_public
from ..checkpoints.registry import load_manifest, load_named
from ..data import load_split
from ..defense import SSNI, Defense, resize
from ..diffusion import VPSchedule
from ..errors import CheckpointError, ConfigError
from ..purifiers import GDMP, GNS, DiffPure
from ..reweight import Calibration, make_reweight
from ..score_norm import dataset_score_norms
from .config import AttackConfig, ExperimentConfig


def load_models(cfg: ExperimentConfig, weights_dir: Path) -> tuple[nn.Module, nn.Module]:
    """``(diffusion model, classifier)`` named in ``cfg.models``, loaded strictly from ``weights_dir``.

    A name is looked up in the folder's manifest (models trained by ``ssni train``), then in
    the registry of public checkpoints (:mod:`ssni.checkpoints.public`). With
    ``models.random_init`` the public architectures get random weights (dry runs).
    """
    manifest = check_models(cfg, weights_dir)
    diffusion, classifier = (_load_one(n, manifest, cfg, weights_dir) for n in (cfg.models.diffusion,
                                                                               cfg.models.classifier))
    return diffusion, classifier


def check_models(cfg: ExperimentConfig, weights_dir: Path) -> dict:
    """Raise a :class:`CheckpointError` that says how to get them if the named models are unknown."""
    manifest = load_manifest(weights_dir)
    names = (cfg.models.diffusion, cfg.models.classifier)
    missing = [n for n in names if n not in manifest and n not in PUBLIC]
    if missing:
        ds = cfg.data.dataset
        raise CheckpointError(f"{weights_dir} has no {' or '.join(missing)} and no public model has that name "
                              f"(`ssni models` lists them); train them with "
                              f"`ssni train score --dataset {ds} --name {names[0]}` and "
                              f"`ssni train classifier --dataset {ds} --name {names[1]}`")
    return manifest


def _load_one(name: str, manifest: dict, cfg: ExperimentConfig, weights_dir: Path) -> nn.Module:
    if name in manifest:
        return load_named(name, weights_dir)
    if cfg.models.random_init:
        return PUBLIC[name].build().eval()
    return load_public(name, weights_dir, cfg.models.allow_pickle)


def calibrate(cfg: ExperimentConfig, unet: nn.Module, weights_dir: Path) -> Calibration:
    """Reference statistics of clean training images; the shipped file is used when it matches."""
    sha = load_manifest(weights_dir).get(cfg.models.diffusion, {}).get("sha256", cfg.models.diffusion)
    meta = {"score_model_sha256": sha, "n_levels": cfg.ssni.n_levels, "n_images": cfg.ssni.calibration_size,
            "split": f"{cfg.data.dataset}/train", "seed": cfg.evaluate.seed}
    shipped = Path(weights_dir) / f"{cfg.models.diffusion}.calibration.json"
    if shipped.is_file() and Calibration.load(shipped).meta == meta:
        return Calibration.load(shipped)
    train = load_split(cfg.data.dataset, "train", cfg.data.root)
    gen = torch.Generator().manual_seed(cfg.evaluate.seed)
    train = train.subset(torch.randperm(len(train), generator=gen)[:cfg.ssni.calibration_size])  # all classes
    images = resize(train.images.to(device_of(unet)), cfg.purifier.resolution)
    norms = dataset_score_norms(unet, VPSchedule(), images, train.ids, cfg.evaluate.seed, cfg.ssni.n_levels)
    return Calibration.fit(norms, **meta)


def build_model(cfg: ExperimentConfig, unet: nn.Module, classifier: nn.Module,
                calibration: Calibration | None) -> nn.Module:
    """The classifier alone (``method = "none"``) or a :class:`Defense`."""
    p = cfg.purifier
    if p.method == "none":
        return classifier.eval()
    common = {"steps": p.steps or None, "eta": p.eta, "checkpoint": p.checkpoint}
    purifier = {"diffpure": lambda: DiffPure(unet, t_star=p.t_star, **common),
                "gdmp": lambda: GDMP(unet, t_star=p.t_star, rounds=p.rounds, guide_scale=p.guide_scale, **common),
                "gns": lambda: GNS(unet, levels=p.levels, **common)}[p.method]()
    ssni = None
    if cfg.ssni.reweight != "none":
        if calibration is None:
            raise ConfigError("SSNI needs a calibration")
        s = cfg.ssni
        reweight = make_reweight(s.reweight, calibration, s.tau, s.bias, s.reference_compat)
        ssni = SSNI(unet, reweight, n_levels=s.n_levels, differentiable=s.differentiable)
    defense = Defense(classifier, purifier, ssni, seed=cfg.evaluate.seed, votes=p.votes, resolution=p.resolution)
    return defense.eval()


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def build_attack(a: AttackConfig, model: nn.Module, seed: int) -> tuple[object, nn.Module]:
    """``(attack, model the attack differentiates)``: BPDA wraps the defense, the rest see it whole."""
    threat = ThreatModel(a.norm, a.eps)
    pgd = {"threat": threat, "steps": a.steps, "step_size": a.step_size, "eot": a.eot,
           "random_start": a.random_start, "sign_step": a.sign_step, "seed": seed, "eot_batch": a.eot_batch}
    if a.name == "pgd":
        return PGD(**pgd), model
    if a.name == "adaptive":
        return AdaptivePGD(**pgd, score_weight=a.score_weight), model
    if a.name == "bpda":
        if not isinstance(model, Defense):
            raise ConfigError("BPDA needs a purifier; [purifier] method is 'none'")
        return PGD(**pgd), BPDA(model)
    return AutoAttackRand(threat, seed=seed), model
