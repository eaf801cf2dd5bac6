"""Reproducible CPU training of the shipped small models.

Each run is seeded (model init, data order, augmentation, diffusion noise),
writes safetensors weights and a manifest entry with the exact command, seed,
data split, training time and final metrics, so every shipped file can be
rebuilt bit-for-bit on the same torch build.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights_io import save_weights
from .checkpoints.registry import load_manifest, register
from .classifiers.small_cnn import SmallCNN, SmallCNNConfig
from .data import SPLIT_SEED, ImageSet, load_split
from .denoisers.unet import UNet, UNetConfig
from .diffusion import VPSchedule, forward_jump, to_model_scale
from .errors import InputError
from .progress import tqdm


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist-5k"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    ema: float = 0.999


def random_shift(x: Tensor, pixels: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``pixels`` in each direction (zero padding)."""
    padded = F.pad(x, [pixels] * 4)
    dx = torch.randint(0, 2 * pixels + 1, (x.shape[0],), generator=gen).tolist()
    dy = torch.randint(0, 2 * pixels + 1, (x.shape[0],), generator=gen).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])


def _batches(data: ImageSet, cfg: TrainConfig, gen: torch.Generator):
    """Endless shuffled mini-batches, epoch after epoch."""
    while True:
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            yield data.images[idx], data.labels[idx]


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageSet, batch: int = 500) -> float:
    model.eval()
    correct = sum((model(data.images[i:i + batch]).argmax(1) == data.labels[i:i + batch]).sum().item()
                  for i in range(0, len(data), batch))
    return correct / len(data)


def _fit(model: nn.Module, loss_fn: Callable, cfg: TrainConfig, data: ImageSet, progress: bool) -> tuple[nn.Module, float]:
    """Adam with cosine decay for ``cfg.steps`` steps, EMA of the weights; return (EMA model, final loss)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    ema, batches, recent = copy.deepcopy(model).eval(), _batches(data, cfg, gen), []
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train", unit="step")
    for _ in bar:
        model.train()
        loss = loss_fn(model, *next(batches), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.state_dict().values(), model.state_dict().values()):
                p_ema.copy_(p_ema * cfg.ema + p * (1 - cfg.ema) if p.is_floating_point() else p)
        recent = (recent + [loss.item()])[-100:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    return ema, sum(recent) / len(recent)


def classifier_loss(model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
    return F.cross_entropy(model(random_shift(x, 2, gen)), y)


def denoising_loss(model: nn.Module, x: Tensor, _y: Tensor, gen: torch.Generator,
                   schedule: VPSchedule = VPSchedule()) -> Tensor:
    """DDPM's simple loss: ``|| eps - eps_theta(x_t, t) ||^2`` at uniform levels ``t`` in ``1..T``."""
    t = torch.randint(1, schedule.num_levels + 1, (x.shape[0],), generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    return F.mse_loss(model(forward_jump(schedule, to_model_scale(x), t, eps), t), eps)


@torch.no_grad()
def denoising_error(model: nn.Module, data: ImageSet, seed: int = 1, schedule: VPSchedule = VPSchedule()) -> float:
    """Mean epsilon-prediction MSE on ``data`` at seeded uniform levels (a held-out metric)."""
    gen = torch.Generator().manual_seed(seed)
    return denoising_loss(model.eval(), data.images, data.labels, gen, schedule).item()


def check_target(weights_dir: Path, name: str, force: bool) -> None:
    """Refuse to overwrite an existing (or shipped) model unless ``force``: training must never
    silently replace ``weights/mnist-unet.safetensors`` and its manifest entry."""
    file = Path(weights_dir) / f"{name}.safetensors"
    if not force and (file.exists() or name in load_manifest(weights_dir)):
        raise InputError(f"{file} or a manifest entry {name!r} already exists in {weights_dir}; choose another "
                         "--name or --weights-dir, or pass --force to replace it")


def train_and_register(kind: str, cfg: TrainConfig, arch_config, weights_dir: Path, name: str,
                       command: str, progress: bool = True, force: bool = False) -> dict:
    """Train a ``classifier`` or ``score`` model, save it and add it to the manifest (refused before
    training if the model exists and ``force`` is not set)."""
    check_target(weights_dir, name, force)
    train, val, test = (load_split(cfg.dataset, part) for part in ("train", "val", "test"))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = SmallCNN(arch_config) if kind == "classifier" else UNet(arch_config)
    start = time.time()
    loss_fn = classifier_loss if kind == "classifier" else denoising_loss
    ema, final_loss = _fit(model, loss_fn, cfg, train, progress)
    seconds = time.time() - start
    if kind == "classifier":
        metrics = {"train_loss": final_loss, "val_acc": accuracy(ema, val), "test_acc": accuracy(ema, test)}
    else:
        metrics = {"train_loss": final_loss, "val_eps_mse": denoising_error(ema, val)}
    arch = "small_cnn" if kind == "classifier" else "unet"
    file = f"{name}.safetensors"
    digest = save_weights(weights_dir / file, ema, {"arch": arch, "config": arch_config.to_dict()})
    entry = {"arch": arch, "config": arch_config.to_dict(), "file": file, "sha256": digest,
             "size_bytes": (weights_dir / file).stat().st_size, "command": command,
             "seed": cfg.seed, "train": cfg.__dict__, "data": {"dataset": cfg.dataset, "split": "train",
             "split_seed": SPLIT_SEED, "n_train": len(train)}, "train_seconds": round(seconds, 1),
             "torch": torch.__version__, "metrics": metrics, "license": "MIT (trained by ssni)"}
    register(weights_dir, name, entry)
    return entry


__all__ = ["TrainConfig", "SmallCNNConfig", "UNetConfig", "train_and_register", "accuracy"]
