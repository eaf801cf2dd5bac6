"""Every command on every device this machine has (CPU always, CUDA when torch sees a GPU).

On a CUDA machine the same tests check the GPU path end to end, and the CPU-vs-CUDA tests state the
guarantee the code gives: fp32 is real fp32 (TF32 off), so per-sample results agree within float
rounding; decisions (predictions, verdicts) are compared exactly only where rounding cannot flip them.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import assert_same_rows

from ssni.evaluate import load_config
from ssni.evaluate.config import AttackConfig
from ssni.evaluate.registries import ATTACKS
from ssni.evaluate.runner import evaluate
from ssni.evaluate.store import Store

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def rows(out, cfg) -> list[dict]:
    store = Store(out / "results.sqlite", cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    found = store.rows()
    store.close()
    return found


def on(cfg, device: str, **attack):
    """The tiny experiment on ``device``, its attack replaced by ``attack`` when given."""
    cfg = replace(cfg, evaluate=replace(cfg.evaluate, device=device))
    if attack:
        cfg = replace(cfg, attacks=(AttackConfig(**{"steps": 1, "eot": 1, **attack}),))
    return cfg


ATTACK_MODES = [(name, mode) for name, entry in ATTACKS.items() for mode in entry.gradients]


@pytest.mark.parametrize("name,gradient", ATTACK_MODES, ids=[f"{n}-{g}" for n, g in ATTACK_MODES])
def test_evaluate_runs_every_attack_and_gradient_mode(device, name, gradient, tiny_config_file, tiny_weights,
                                                      tmp_path):
    cfg = on(load_config(tiny_config_file), device, name=name, gradient=gradient)
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
    found = rows(tmp_path / "run", cfg)
    assert len(found) == 2 and all(r["t_star"] for r in found)
    key = f"0:{name}"
    attacked = [r for r in found if r["clean_correct"]]
    assert all(key in r["attacks"] and len(r["attacks"][key]["preds"]) >= 1 for r in attacked)


def test_resume_and_shards_on_the_device(device, tiny_config_file, tiny_weights, tmp_path, monkeypatch):
    from ssni.evaluate import runner

    cfg = on(replace(load_config(tiny_config_file), data=replace(load_config(tiny_config_file).data, n=4)), device)
    evaluate(cfg, tmp_path / "one", tiny_weights, progress=False)
    for rank in (1, 0):
        evaluate(cfg, tmp_path / "two", tiny_weights, progress=False, rank=rank, world=2)
    real, calls = runner.run_batch, []

    def stop_at_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(runner, "run_batch", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, tmp_path / "resumed", tiny_weights, progress=False)
    monkeypatch.setattr(runner, "run_batch", real)
    evaluate(cfg, tmp_path / "resumed", tiny_weights, progress=False)
    for other in ("two", "resumed"):
        assert_same_rows(rows(tmp_path / other, cfg), rows(tmp_path / "one", cfg))


def test_demo_on_the_device(device, tiny_weights, tmp_path):
    from ssni.demo import demo_config, run_demo

    cfg = demo_config(True, n_test=2, pgd_steps=1, eot=1, steps=2, t_star=20, n_levels=2, calibration_size=8,
                      batch_size=2, rescore_draws=2, device=device)
    results = run_demo(cfg, tmp_path / "demo", tiny_weights, progress=False)
    assert len(results["rows"]) == 4 and all(0 <= r["clean_acc"] <= 1 for r in results["rows"])
    saved = json.loads((tmp_path / "demo" / "runs" / "diffpure" / "config.json").read_text())
    assert saved["evaluate"]["device"] == device


def test_converge_on_the_device(device, tiny_config_file, tiny_weights, tmp_path):
    from ssni.evaluate.convergence import run_convergence

    cfg = on(load_config(tiny_config_file), device)
    result = run_convergence(cfg, tmp_path / "conv", None, {"steps": (1, 2)}, tiny_weights, False, "tiny")
    assert (tmp_path / "conv" / "convergence.json").is_file() and result["choice"]


def test_purify_on_the_device(device, tiny_config_file, tiny_weights, tmp_path):
    from PIL import Image

    from ssni.purify_folder import purify_folder

    source = tmp_path / "digits"
    source.mkdir()
    for k in range(3):
        Image.fromarray((torch.rand(28, 28) * 255).byte().numpy(), mode="L").save(source / f"{k}.png")
    cfg = on(load_config(tiny_config_file), device)
    table = purify_folder(cfg, source, tmp_path / "purified", tiny_weights, width=2, chunk=2, progress=False)
    assert len(table.read_text().splitlines()) == 4
    assert len(list((tmp_path / "purified").rglob("*.png"))) == 3


def test_plan_on_the_device_picks_auto_settings_that_fit(device, tiny_config_file, tiny_weights):
    from ssni.evaluate.plan import format_plan, plan_run

    cfg = on(load_config(tiny_config_file, {"evaluate.batch_size": "auto", "attacks.0.eot_batch": "auto",
                                            "purifier.checkpoint": "auto", "data.n": 4}), device)
    plan = plan_run(cfg, tiny_weights, probe=2)
    chosen = plan["auto"]
    assert chosen["fits"] and 1 <= chosen["batch_size"] <= 4 and chosen["eot_batch"] == {"0:pgd": 1}  # eot 1
    assert isinstance(chosen["checkpoint"], bool) and plan["batch"] == chosen["batch_size"]
    text = format_plan(plan)
    assert text.startswith("auto: batch_size") and "GFLOP per forward row" in text and "K=2" in text
    assert plan["roofline"]["network_forward_flops"] > 0 and plan["roofline"]["plan_over_floor"]


@needs_cuda
def test_cpu_and_cuda_agree_on_a_run(tiny_config_file, tiny_weights, tmp_path):
    """fp32 on both: score norms within float rounding, and the same clean predictions and levels."""
    cfg = load_config(tiny_config_file, {"data.n": 4})
    results = {}
    for device in ("cpu", "cuda"):
        run = on(cfg, device)
        evaluate(run, tmp_path / device, tiny_weights, progress=False)
        results[device] = rows(tmp_path / device, run)
    for a, b in zip(results["cpu"], results["cuda"]):
        assert a["score_norm"] == pytest.approx(b["score_norm"], rel=1e-4)
        assert a["clean_pred"] == b["clean_pred"] and a["t_star"] == b["t_star"]


class _Watched(torch.Tensor):
    """Sample ids that record every call that could move them to another device."""

    moves: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.to):
            cls.moves.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("name", ["pgd", "apgd", "adaptive"])
def test_attacks_keep_the_sample_ids_where_the_run_put_them(device, name, tiny_unet, tiny_classifier, images):
    """The runner puts a batch's ids on the run's device once; the attacks and the defense derive the noise
    seeds there and never move the ids (they moved them to the host, which on a GPU is a read per attack
    and a copy of the seeds back to the device per pass)."""
    from ssni import SSNI, Calibration, Defense, DiffPure, make_reweight
    from ssni.attacks import APGD, PGD, ThreatModel
    from ssni.attacks.adaptive import AdaptiveAttack

    reweight = make_reweight("sigmoid", Calibration.fit(torch.tensor([1.0, 2.0, 3.0])))
    defense = Defense(tiny_classifier, DiffPure(tiny_unet, t_star=4, steps=2),
                      SSNI(tiny_unet, reweight, n_levels=2)).eval().to(device)
    attack = {"pgd": PGD(ThreatModel("linf", 0.1), steps=2, eot=2, eot_batch=2, random_start=True),
              "apgd": APGD(ThreatModel("linf", 0.1), steps=2, eot=2),
              "adaptive": AdaptiveAttack(ThreatModel("linf", 0.1), steps=1, eot=1, restarts=2)}[name]
    seen = []
    defense.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["sample_ids"].device), with_kwargs=True)
    ids = torch.arange(100, 100 + len(images), device=device).as_subclass(_Watched)
    _Watched.moves.clear()
    x_adv = attack(defense, images.to(device), torch.zeros(len(images), dtype=torch.long, device=device), ids)
    assert _Watched.moves == [] and seen and set(seen) == {ids.device}
    assert x_adv.device == ids.device
