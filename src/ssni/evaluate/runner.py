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

from ..checkpoints.registry import default_weights_dir
from ..defense import Defense
from ..errors import InputError
from ..progress import tqdm
from ..rng import ATTACK_DRAW, CLEAN_DRAW, RESCORE_DRAW
from ..runtime import compile_network, halving_on_oom, on_device, precision_mode, resolve_device
from .auto import format_choice, has_auto, resolve_auto, without_auto
from .build import build_attack, build_model, calibrate, load_eval_data, load_models
from .config import ExperimentConfig
from .scoring import candidate_fields, robust_under, still_attackable, stored_candidate, union_verdicts
from .store import RESULTS_FILE as RESULTS
from .store import Store, exclusive


def predict(model: nn.Module, x: Tensor, ids: Tensor, draw: int) -> Tensor:
    with torch.no_grad():
        return model.predict(x, sample_ids=ids, draw=draw) if isinstance(model, Defense) else model(x).argmax(1)


def fresh_predictions(model: nn.Module, x_adv: Tensor, ids: Tensor, draws: int) -> Tensor:
    """``[draws, B]`` predictions on fresh randomness (draws the clean pass and attacks never use)."""
    return torch.stack([predict(model, x_adv, ids, RESCORE_DRAW + r) for r in range(draws)])


def worst_candidate(model: nn.Module, candidates: list[Tensor], y: Tensor, ids: Tensor,
                    draws: int) -> tuple[Tensor, Tensor]:
    """``(stored example [B, ...], [K, draws, B] fresh predictions of every candidate)``.

    An attack that returns several outputs (AutoAttack's APGD runs) has each scored as its own entry
    on the same fresh draws, and a sample is robust only against all of them
    (:func:`ssni.evaluate.scoring.union_verdicts`): no choice among candidates is made on the draws
    that score them. The stored example is the candidate with the fewest correct draws (the first on
    ties), for its image, score norm and levels only."""
    preds = torch.stack([fresh_predictions(model, c, ids, draws) for c in candidates])  # [K, N, B]
    pick = stored_candidate(preds, y)
    rows = torch.arange(len(y), device=pick.device)
    return torch.stack(candidates)[pick, rows], preds


def to_device(cfg: ExperimentConfig, *models: nn.Module) -> tuple[nn.Module, ...]:
    """Move the networks to the run's device (:func:`ssni.runtime.resolve_device` of ``evaluate.device``;
    ``cuda:N`` by ``LOCAL_RANK`` under torchrun), in the layout ``evaluate.channels_last`` asks for."""
    device = resolve_device(cfg.evaluate.device)
    fmt = torch.channels_last if cfg.evaluate.channels_last else torch.preserve_format
    return tuple(m.to(device=device, memory_format=fmt) for m in models)


def prepare_model(cfg: ExperimentConfig, weights_dir: Path, out: Path | None = None) -> nn.Module:
    """The configured model on its device: networks loaded, SSNI calibrated (saved into ``out``),
    the networks compiled if asked."""
    unet, classifier = to_device(cfg, *load_models(cfg, weights_dir))
    with precision(cfg):
        calibration = calibrate(without_auto(cfg), unet, weights_dir) if cfg.ssni.reweight != "none" else None
    if calibration is not None and out is not None:
        calibration.save(out / "calibration.json")
    if cfg.evaluate.compile:  # static shapes, rows bucketed to a few widths (ssni.runtime.compile_network)
        mode = None if cfg.evaluate.compile_mode == "default" else cfg.evaluate.compile_mode
        unet, classifier = compile_network(unet, mode), compile_network(classifier, mode)
    return build_model(cfg, unet, classifier, calibration)


def precision(cfg: ExperimentConfig):
    """The context every network call of the run goes through: ``evaluate.precision`` on its device
    (:func:`ssni.runtime.precision_mode`: fp32 is real fp32, tf32 and bf16 are opt-in)."""
    return precision_mode(cfg.evaluate.precision, resolve_device(cfg.evaluate.device))


def shard_positions(n: int, rank: int, world: int) -> Tensor:
    return torch.arange(rank, n, world)


def run_batch(cfg: ExperimentConfig, model: nn.Module, attacks: list, x: Tensor, y: Tensor,
              ids: Tensor) -> tuple[list[dict], dict]:
    """Rows of one batch and its adversarial images ``{(sample id, "k:attack"): image}``.

    Each attack of the cascade runs on the samples still robust under some protocol; its
    examples are re-classified on ``rescore_draws`` fresh draws, and every protocol's verdict
    (see :mod:`ssni.evaluate.scoring`) is stored with the raw predictions.
    """
    start = time.time()
    clean_pred = predict(model, x, ids, CLEAN_DRAW)
    if isinstance(model, Defense):
        info = model.explain(x, sample_ids=ids, draw=CLEAN_DRAW)
        e, t = info["score_norm"], info["t_star"].T.tolist()
    else:
        e, t = None, [[] for _ in ids]
    per_attack, images = [{} for _ in ids], {}
    attackable = clean_pred == y
    for k, (a_cfg, (attack, target)) in enumerate(zip(cfg.attacks, attacks)):
        sel = attackable.nonzero().flatten()
        if sel.numel() == 0:
            continue
        if isinstance(model, Defense):
            model.draw = (k + 1) * ATTACK_DRAW
        x_adv = attack(target, x[sel], y[sel], sample_ids=ids[sel])
        x_adv, preds = worst_candidate(model, getattr(attack, "candidates", None) or [x_adv], y[sel], ids[sel],
                                       cfg.evaluate.rescore_draws)
        entries, verdicts = score_attack(model, a_cfg, attack, x_adv, preds, y[sel], ids[sel])
        for j, i in enumerate(sel.tolist()):
            per_attack[i][f"{k}:{a_cfg.name}"] = entries[j]
            images[(int(ids[i]), f"{k}:{a_cfg.name}")] = x_adv[j]
        attackable[sel] &= still_attackable(verdicts)
    seconds = (time.time() - start) / len(ids)
    rows = [{"sample_id": int(ids[i]), "label": int(y[i]), "clean_pred": int(clean_pred[i]),
             "clean_correct": int(clean_pred[i] == y[i]), "score_norm": None if e is None else float(e[i]),
             "t_star": t[i], "attacks": per_attack[i], "seconds": seconds} for i in range(len(ids))]
    keys = [f"{k}:{a.name}" for k, a in enumerate(cfg.attacks)]
    for row, robust in zip(rows, robust_under(rows, keys, cfg.evaluate.rescore)):
        row["robust"] = int(robust)  # under the headline protocol; summaries recompute every protocol
    return rows, images


def score_attack(model: nn.Module, a_cfg, attack, x_adv: Tensor, preds: Tensor, y: Tensor,
                 ids: Tensor) -> tuple[list[dict], dict[str, Tensor]]:
    """Per attacked sample: the raw fresh predictions, every protocol's verdict, whether an iterate
    fooled the attack's own draws, and (a :class:`Defense`) the score norm and levels the adversarial
    example gets on the first fresh draw (SSNI: does the attack lower the noise?)."""
    verdicts, pick = union_verdicts(preds, y), stored_candidate(preds, y)  # preds: [K, N, B] (worst_candidate)
    # iterates judged on a surrogate chain say nothing about the defense that is scored
    during = None if a_cfg.gradient == "surrogate" else getattr(attack, "fooled_any_iterate", None)
    norms, levels = None, None
    if isinstance(model, Defense):
        with torch.no_grad():
            info = model.explain(x_adv, sample_ids=ids, draw=RESCORE_DRAW)
        norms, levels = info["score_norm"], info["t_star"]
    entries = [{**candidate_fields(preds, pick, j), **{p: bool(v[j]) for p, v in verdicts.items()},
                "fooled_during": None if during is None else bool(during[j]),
                "score_norm": None if norms is None else float(norms[j]),
                "t_star": [] if levels is None else levels[:, j].tolist()} for j in range(len(y))]
    return entries, verdicts


def evaluate(cfg: ExperimentConfig, out: Path, weights_dir: Path | None = None, progress: bool = True,
             rank: int | None = None, world: int | None = None) -> Path:
    """Run (or resume) the experiment into ``out``; return the path of the merged store."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    weights_dir = Path(weights_dir or default_weights_dir())
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    name = RESULTS if world == 1 else f"shard-{rank}-of-{world}.sqlite"
    with exclusive(out / name):
        store = Store(out / name, cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
        model = prepare_model(cfg, weights_dir, out if rank == 0 else None)
        data = load_eval_data(cfg)
        data = data.subset(shard_positions(len(data), rank, world))
        done = store.done_ids()
        todo = torch.tensor([i for i, sid in enumerate(data.ids.tolist()) if sid not in done], dtype=torch.long)
        # "auto" is measured only when there is work: not for a finished folder or an empty shard
        cfg, choice = choose_speed(cfg, model, data, world) if len(todo) else (without_auto(cfg), {})
        if choice and progress:
            tqdm.write(format_choice(choice))
        if len(todo) or not (out / "config.json").is_file():  # keep the speed a finished run used
            (out / "config.json").write_text(json.dumps({"hash": cfg.hash(), **cfg.to_dict()}, indent=2) + "\n")
        if choice:
            (out / "speed.json").write_text(json.dumps(choice, indent=2) + "\n")
        attacks = [build_attack(a, model, cfg.evaluate.seed) for a in cfg.attacks]
        for attack, _ in attacks:  # a nested bar per attack shows its iterations with an ETA
            if hasattr(attack, "progress"):
                attack.progress = progress
        bar = tqdm(total=len(data), initial=len(data) - len(todo), desc=f"evaluate[{rank}]", unit="img",
                   disable=not progress)
        run_all_batches(cfg, model, attacks, data, todo, store, bar)
        bar.close()
        store.close()
    return merge_shards(cfg, out, rank, world)


def choose_speed(cfg: ExperimentConfig, model: nn.Module, data, world: int = 1,
                 probe: int = 16) -> tuple[ExperimentConfig, dict]:
    """``cfg`` with its ``"auto"`` speed settings measured on the first ``probe`` images
    (:func:`ssni.evaluate.auto.resolve_auto`), and the choice (empty when nothing was ``"auto"``)."""
    if not has_auto(cfg):
        return cfg, {}
    x, y = on_device(resolve_device(cfg.evaluate.device), data.images[:probe], data.labels[:probe])
    with precision(cfg):
        return resolve_auto(cfg, model, x, y, world)


def run_all_batches(cfg: ExperimentConfig, model: nn.Module, attacks: list, data, todo: Tensor, store: Store,
                    bar) -> None:
    """Evaluate the samples at positions ``todo`` batch by batch, committing each batch's rows.

    A batch that runs out of device memory is run again at half the rows, and the run keeps the
    smaller batch (batch size is speed-only: the rows are the same); one row that does not fit
    ends the run with a :class:`ssni.errors.ResourceError`."""
    device, size, start = resolve_device(cfg.evaluate.device), cfg.evaluate.batch_size, 0

    def batch(n: int):
        idx = todo[start:start + n]
        x, y, ids = on_device(device, data.images[idx], data.labels[idx], data.ids[idx])
        with precision(cfg):
            return run_batch(cfg, model, attacks, x, y, ids)

    def said(n: int, half: int) -> None:
        bar.write(f"out of memory on {device} at a batch of {n}: continuing at {half} "
                  "(results do not depend on the batch size)")

    while start < len(todo):
        (rows, images), size = halving_on_oom(batch, min(size, len(todo) - start), device, said)
        store.add(rows, images)
        start += size
        bar.update(size)


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
    """Defense checks and gradient-masking checks on the first ``n`` samples, with the first PGD-type attack
    as configured: its gradient mode (exact, surrogate or BPDA) is the one the checks attack through.
    ``"auto"`` speed settings take their small safe fallbacks (16 samples need no measurement)."""
    from ..attacks.checks import all_passed, defense_checks, sanity_checks
    from ..attacks.pgd import PGD

    cfg = without_auto(cfg)
    model = prepare_model(cfg, Path(weights_dir or default_weights_dir()))
    data = load_eval_data(cfg, min(n, cfg.data.n))
    attack, target = next((build_attack(a, model, cfg.evaluate.seed) for a in cfg.attacks
                           if a.name in ("pgd", "apgd", "bpda")), (None, model))  # the checks compare budgets
    x, y, ids = on_device(resolve_device(cfg.evaluate.device), data.images, data.labels, data.ids)
    checks = defense_checks(model, x, y)
    if isinstance(attack, PGD):
        checks += sanity_checks(model, attack, x, y, ids, cfg.evaluate.rescore_draws, target)
    if isinstance(model, Defense):  # fidelity of every gradient mode to the exact one (informative entries)
        from ..attacks.gradient_modes import cosine_checks, gradient_cosines
        from .config import AttackConfig

        pgd_like = [a for a in cfg.attacks if a.name in ("pgd", "apgd", "bpda", "adaptive")] or [AttackConfig()]
        steps = next((a.surrogate_steps for a in pgd_like if a.gradient == "surrogate"), pgd_like[0].surrogate_steps)
        m = min(len(data), 8)
        checks += cosine_checks(gradient_cosines(model, x[:m], y[:m], ids[:m], eot=pgd_like[0].eot,
                                                 surrogate_steps=steps), steps)
    return {"n": len(data), "checks": checks, "all_passed": all_passed(checks)}
