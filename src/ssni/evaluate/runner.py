"""Clean pass -> attack cascade on still-robust samples -> fresh-randomness re-score, per sample.

Every random draw of a sample is keyed by its id (see :mod:`ssni.rng`) and the
draw indices are fixed per purpose (clean pass, attack ``k``, re-score ``r``),
so a sample's row does not depend on its batch, on sharding, or on whether the
run was interrupted and resumed. Rows are committed batch by batch.

Sharding: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) rank ``r`` of ``W``
takes the samples at positions ``r, r + W, ...`` and writes
``shard-r-of-W.sqlite``; rank 0 merges every shard into ``results.sqlite``
after a barrier (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoints.registry import default_weights_dir
from ..data import load_split
from ..defense import Defense
from .build import build_attack, build_model, calibrate, load_models
from .config import ExperimentConfig
from .store import RESULTS_FILE as RESULTS
from .store import Store

CLEAN_DRAW = 0
ATTACK_DRAW = 1_000_000  # attack k uses draws from (k + 1) * ATTACK_DRAW on
RESCORE_DRAW = 1_000_000_000


def predict(model: nn.Module, x: Tensor, ids: Tensor, draw: int) -> Tensor:
    with torch.no_grad():
        return model.predict(x, sample_ids=ids, draw=draw) if isinstance(model, Defense) else model(x).argmax(1)


def rescore(model: nn.Module, x_adv: Tensor, y: Tensor, ids: Tensor, protocol: str, draws: int) -> tuple[Tensor, Tensor]:
    """``(prediction, correct)`` on fresh randomness: one draw, worst of ``draws``, or their majority."""
    preds = torch.stack([predict(model, x_adv, ids, RESCORE_DRAW + r) for r in range(draws)])
    if protocol == "majority":
        pred = torch.mode(preds, dim=0).values
        return pred, pred == y
    wrong = preds != y
    first_wrong = torch.where(wrong.any(0), preds.gather(0, wrong.float().argmax(0)[None])[0], preds[0])
    return first_wrong, ~wrong.any(0) if protocol == "worst" else preds[0] == y


def to_device(cfg: ExperimentConfig, *models: nn.Module) -> tuple[nn.Module, ...]:
    """Move the networks to ``evaluate.device`` (``cuda:N`` by ``LOCAL_RANK`` under torchrun)."""
    device = torch.device(cfg.evaluate.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    fmt = torch.channels_last if device.type == "cuda" else torch.preserve_format
    return tuple(m.to(device=device, memory_format=fmt) for m in models)


def prepare_model(cfg: ExperimentConfig, weights_dir: Path, out: Path | None = None) -> nn.Module:
    """The configured model on its device: networks loaded, SSNI calibrated (saved into ``out``),
    the diffusion network compiled if asked."""
    unet, classifier = to_device(cfg, *load_models(cfg, weights_dir))
    calibration = calibrate(cfg, unet, weights_dir) if cfg.ssni.reweight != "none" else None
    if calibration is not None and out is not None:
        calibration.save(out / "calibration.json")
    if cfg.evaluate.compile:
        unet = torch.compile(unet, dynamic=True)
    return build_model(cfg, unet, classifier, calibration)


def autocast(cfg: ExperimentConfig):
    """bf16 autocast of the networks when ``evaluate.precision = "bf16"`` (a no-op context otherwise)."""
    return torch.autocast(torch.device(cfg.evaluate.device).type, torch.bfloat16,
                          enabled=cfg.evaluate.precision == "bf16")


def shard_positions(n: int, rank: int, world: int) -> Tensor:
    return torch.arange(rank, n, world)


def run_batch(cfg: ExperimentConfig, model: nn.Module, attacks: list, x: Tensor, y: Tensor,
              ids: Tensor) -> tuple[list[dict], dict]:
    """Rows of one batch and its adversarial images ``{(sample id, "k:attack"): image}``."""
    start = time.time()
    clean_pred = predict(model, x, ids, CLEAN_DRAW)
    robust = clean_pred == y
    if isinstance(model, Defense):
        info = model.explain(x, sample_ids=ids, draw=CLEAN_DRAW)
        e, t = info["score_norm"], info["t_star"].T.tolist()
    else:
        e, t = None, [[] for _ in ids]
    per_attack, images = [{} for _ in ids], {}
    for k, (a_cfg, (attack, target)) in enumerate(zip(cfg.attacks, attacks)):
        sel = robust.nonzero().flatten()
        if sel.numel() == 0:
            continue
        if isinstance(model, Defense):
            model.draw = (k + 1) * ATTACK_DRAW
        x_adv = attack(target, x[sel], y[sel], sample_ids=ids[sel])
        pred, ok = rescore(model, x_adv, y[sel], ids[sel], cfg.evaluate.rescore, cfg.evaluate.rescore_draws)
        for j, i in enumerate(sel.tolist()):
            per_attack[i][f"{k}:{a_cfg.name}"] = {"pred": int(pred[j]), "correct": bool(ok[j])}
            images[(int(ids[i]), f"{k}:{a_cfg.name}")] = x_adv[j]
        robust[sel] &= ok
    seconds = (time.time() - start) / len(ids)
    rows = [{"sample_id": int(ids[i]), "label": int(y[i]), "clean_pred": int(clean_pred[i]),
             "clean_correct": int(clean_pred[i] == y[i]), "score_norm": None if e is None else float(e[i]),
             "t_star": t[i], "attacks": per_attack[i], "robust": int(robust[i]), "seconds": seconds}
            for i in range(len(ids))]
    return rows, images


def evaluate(cfg: ExperimentConfig, out: Path, weights_dir: Path | None = None, progress: bool = True,
             rank: int | None = None, world: int | None = None) -> Path:
    """Run (or resume) the experiment into ``out``; return the path of the merged store."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    weights_dir = Path(weights_dir or default_weights_dir())
    out.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    name = RESULTS if world == 1 else f"shard-{rank}-of-{world}.sqlite"
    store = Store(out / name, cfg.hash(), config_json)
    (out / "config.json").write_text(json.dumps({"hash": cfg.hash(), **cfg.to_dict()}, indent=2) + "\n")
    model = prepare_model(cfg, weights_dir, out if rank == 0 else None)
    attacks = [build_attack(a, model, cfg.evaluate.seed) for a in cfg.attacks]
    data = load_split(cfg.data.dataset, cfg.data.split, cfg.data.root).head(cfg.data.n)
    data = data.subset(shard_positions(len(data), rank, world))
    done = store.done_ids()
    todo = torch.tensor([i for i, sid in enumerate(data.ids.tolist()) if sid not in done],
                        dtype=torch.long)
    bs = cfg.evaluate.batch_size
    bar = tqdm(total=len(data), initial=len(data) - len(todo), desc=f"evaluate[{rank}]", unit="img",
               disable=not progress)
    for b in range(0, len(todo), bs):
        idx = todo[b:b + bs]
        x, y = data.images[idx].to(cfg.evaluate.device), data.labels[idx].to(cfg.evaluate.device)
        with autocast(cfg):
            store.add(*run_batch(cfg, model, attacks, x, y, data.ids[idx]))
        bar.update(len(idx))
    bar.close()
    store.close()
    return merge_shards(cfg, out, rank, world)


def merge_shards(cfg: ExperimentConfig, out: Path, rank: int, world: int) -> Path:
    """After all ranks finish, rank 0 copies every shard into ``results.sqlite``."""
    if world == 1:
        return out / RESULTS
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        config_json = json.dumps(cfg.to_dict(), sort_keys=True)
        merged = Store(out / RESULTS, cfg.hash(), config_json)
        for r in range(world):
            shard = Store(out / f"shard-{r}-of-{world}.sqlite", cfg.hash(), config_json)
            merged.merge_from(shard)
            shard.close()
        merged.close()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out / RESULTS


def run_sanity(cfg: ExperimentConfig, weights_dir: Path | None = None, n: int = 16) -> dict:
    """Defense checks and gradient-masking checks on the first ``n`` samples, with the first PGD-type attack."""
    from ..attacks.checks import defense_checks, sanity_checks
    from ..attacks.pgd import PGD

    model = prepare_model(cfg, Path(weights_dir or default_weights_dir()))
    data = load_split(cfg.data.dataset, cfg.data.split, cfg.data.root).head(min(n, cfg.data.n))
    attack = next((build_attack(a, model, cfg.evaluate.seed)[0] for a in cfg.attacks if a.name in ("pgd", "adaptive")),
                  None)
    x, y = data.images.to(cfg.evaluate.device), data.labels.to(cfg.evaluate.device)
    checks = defense_checks(model, x, y)
    if isinstance(attack, PGD):
        checks += sanity_checks(model, attack, x, y, data.ids)
    return {"n": len(data), "checks": checks, "all_passed": all(c["passed"] for c in checks)}
