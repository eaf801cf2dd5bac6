"""From an :class:`ExperimentConfig` to models and attacks (one place for both the demo and evaluate)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..attacks import ThreatModel
from ..attacks.gradient_modes import gradient_target
from ..checkpoints.models import find_model, load_model
from ..checkpoints.registry import MANIFEST, default_weights_dir, load_manifest
from ..data import IMAGE_FORMATS, ImageSet, load_split
from ..defense import SSNI, Defense, resize
from ..diffusion import VPSchedule
from ..errors import CheckpointError, ConfigError
from ..reweight import Calibration, make_reweight
from ..score_norm import dataset_score_norms
from .config import AttackConfig, ExperimentConfig
from .config_checks import check_gradient
from .registries import ATTACKS, PURIFIERS


def load_models(cfg: ExperimentConfig, weights_dir: Path) -> tuple[nn.Module, nn.Module]:
    """``(diffusion model, classifier)`` named in ``cfg.models``, loaded strictly from ``weights_dir``.

    Names are resolved by the one model registry (:mod:`ssni.checkpoints.models`: the folder's
    manifest, then the public checkpoints). With
    ``models.random_init`` the public architectures get random weights (dry runs).
    """
    check_models(cfg, weights_dir)
    m = cfg.models
    return tuple(load_model(name, weights_dir, random_init=m.random_init, allow_pickle=m.allow_pickle)
                 for name in (m.diffusion, m.classifier))


def check_models(cfg: ExperimentConfig, weights_dir: Path) -> None:
    """Raise a :class:`CheckpointError` that says how to get them if the named models are unknown: a
    model shipped with the package is in the default weights folder, the others are trained."""
    missing = [(kind, name) for kind, name in (("score", cfg.models.diffusion), ("classifier", cfg.models.classifier))
               if find_model(name, weights_dir) is None]
    if not missing:
        return
    shipped_dir = default_weights_dir()
    shipped = load_manifest(shipped_dir)
    ships = [name for _, name in missing if name in shipped]
    train = [(kind, name) for kind, name in missing if name not in shipped]
    hints = [(f"{' and '.join(ships)} ship{'s' if len(ships) == 1 else ''} with the package "
              f"({', '.join(str(shipped_dir / shipped[n]['file']) for n in ships)}): drop --weights-dir, or copy "
              f"the file{'s' if len(ships) > 1 else ''} and {'its entry' if len(ships) == 1 else 'their entries'} "
              f"in {shipped_dir / MANIFEST} into {weights_dir}")] if ships else []
    if train:
        how = " and ".join(f"`ssni train {kind} --dataset {cfg.data.dataset} --name {name}`" for kind, name in train)
        hints.append(f"train {'it' if len(train) == 1 else 'them'} with {how}")
    raise CheckpointError(f"{weights_dir} has no {' or '.join(name for _, name in missing)} and no public model "
                          f"has that name (`ssni models` lists them); {'; '.join(hints)}")


def load_eval_data(cfg: ExperimentConfig, n: int | None = None) -> ImageSet:
    """The images a run evaluates: the first ``n`` (default ``data.n``) of ``data.split`` in the
    ``data.subset`` order (``"paper"``: the reference code's seeded draw, :func:`ssni.data.paper_order`)."""
    d = cfg.data
    return load_split(d.dataset, d.split, d.root, d.subset, d.subset_seed, n=d.n if n is None else n)


def calibrate(cfg: ExperimentConfig, unet: nn.Module, weights_dir: Path) -> Calibration:
    """Reference statistics of clean images (METHOD §3), one set shared by every evaluation seed.

    The images (``ssni.calibration_size`` of the ``ssni.calibration_split`` part, drawn with
    ``ssni.calibration_seed``) and their score-norm noise depend on ``calibration_seed`` only,
    never on ``evaluate.seed``: seeds 121, 122, 123 share one calibration, as the authors share
    one reference file. ``calibration_split = "val"`` calibrates on held-out clean images the
    diffusion model was not trained on. A file whose settings match is used instead of
    recomputing: ``ssni.calibration_file`` (written there when missing), else the shipped
    ``<diffusion>.calibration.json`` of ``weights_dir``.
    """
    calibration, meta = saved_calibration(cfg, weights_dir)
    if calibration is not None:
        return calibration
    calibration = _fit_calibration(cfg, unet, meta)
    own = Path(cfg.ssni.calibration_file) if cfg.ssni.calibration_file else None
    if own is not None:
        own.parent.mkdir(parents=True, exist_ok=True)
        calibration.save(own)
    return calibration


def saved_calibration(cfg: ExperimentConfig, weights_dir: Path) -> tuple[Calibration | None, dict]:
    """The calibration file :func:`calibrate` would use (or ``None``), and the settings it must match."""
    s = cfg.ssni
    if s.calibration_split == cfg.data.split:
        raise ConfigError(f"ssni.calibration_split = {s.calibration_split!r} is the evaluated split; "
                          "calibrate on another part (train or val)")
    sha = load_manifest(weights_dir).get(cfg.models.diffusion, {}).get("sha256", cfg.models.diffusion)
    meta = {"score_model_sha256": sha, "n_levels": s.n_levels, "n_images": s.calibration_size,
            "split": f"{cfg.data.dataset}/{s.calibration_split}", "seed": s.calibration_seed}
    own = Path(s.calibration_file) if s.calibration_file else None
    for path in (own, Path(weights_dir) / f"{cfg.models.diffusion}.calibration.json"):
        if path is not None and path.is_file() and Calibration.load(path).meta == meta:
            return Calibration.load(path), meta
    if own is not None and own.exists():
        raise ConfigError(f"{own} holds a calibration of other settings ({Calibration.load(own).meta}, expected "
                          f"{meta}); delete it or set ssni.calibration_file to another path")
    return None, meta


def _fit_calibration(cfg: ExperimentConfig, unet: nn.Module, meta: dict) -> Calibration:
    s = cfg.ssni
    gen = torch.Generator().manual_seed(s.calibration_seed)
    part = load_split(cfg.data.dataset, s.calibration_split, cfg.data.root,  # a seeded draw from all classes
                      pick=lambda size: torch.randperm(size, generator=gen)[:s.calibration_size])
    images = resize(part.images.to(device_of(unet)), cfg.purifier.resolution)
    # in chunks of the run's batch: the same network calls as the run's own score-norm passes
    norms = dataset_score_norms(unet, VPSchedule(), images, part.ids, s.calibration_seed, s.n_levels,
                                batch_size=cfg.evaluate.batch_size, max_rows=cfg.evaluate.max_rows)
    return Calibration.fit(norms, **meta)


def build_model(cfg: ExperimentConfig, unet: nn.Module, classifier: nn.Module,
                calibration: Calibration | None) -> nn.Module:
    """The classifier alone (``method = "none"``) or a :class:`Defense`."""
    p = cfg.purifier
    if p.method == "none":
        return classifier.eval()
    # "auto" starts off; ssni.evaluate.auto turns it on when the attack would not fit without it
    common = {"steps": p.steps or None, "eta": p.eta, "checkpoint": p.checkpoint is True, "solver": p.solver}
    if p.clip_x0 is not None:  # None keeps each method's reference default
        common["clip_x0"] = p.clip_x0
    purifier = PURIFIERS[p.method].build(unet, **asdict(p.settings), **common)
    ssni = None
    if cfg.ssni.reweight != "none":
        if calibration is None:
            raise ConfigError("SSNI needs a calibration")
        s = cfg.ssni
        reweight = make_reweight(s.reweight, calibration, s.tau, s.bias, s.reference_compat)
        ssni = SSNI(unet, reweight, n_levels=s.n_levels, differentiable=s.differentiable)
    image_size = IMAGE_FORMATS.get(cfg.data.dataset, (None, None))[1]
    defense = Defense(classifier, purifier, ssni, seed=cfg.evaluate.seed, votes=p.votes, resolution=p.resolution,
                      image_size=image_size, max_rows=cfg.evaluate.max_rows)
    return defense.eval()


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def build_attack(a: AttackConfig, model: nn.Module, seed: int) -> tuple[object, nn.Module]:
    """``(attack, model the attack differentiates)``; ``a.gradient`` chooses the second
    (:func:`ssni.attacks.gradient_modes.gradient_target`). ``name = "bpda"`` is PGD with
    ``gradient = "bpda"``."""
    threat = ThreatModel(a.norm, a.eps)
    pgd = {"threat": threat, "steps": a.steps, "step_size": a.step_size, "eot": a.eot,
           "random_start": a.random_start, "sign_step": a.sign_step, "seed": seed, "eot_batch": a.eot_batch}
    if a.name not in ATTACKS:
        raise ConfigError(f"unknown attack {a.name!r}; choose one of {sorted(ATTACKS)}")
    check_gradient(a.name, a.gradient)
    mode = "bpda" if a.name == "bpda" else a.gradient
    apgd = {"threat": threat, "steps": a.steps, "eot": a.eot, "seed": seed, "eot_batch": a.eot_batch,
            "loss": a.loss, "restarts": a.restarts, "targeted": a.targeted, "iterate": a.iterate}
    return ATTACKS[a.name].build(a, pgd, apgd), gradient_target(model, mode, a.surrogate_steps)
