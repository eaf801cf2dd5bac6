import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ssni.errors import ConfigError, ResumeError
from ssni.evaluate import load_config
from ssni.evaluate import runner as runner_module
from ssni.evaluate.config import AttackConfig, from_dict
from ssni.evaluate.runner import evaluate, rescore
from ssni.evaluate.store import Store
from ssni.evaluate.summary import summarize

CONFIG = """
[data]
n = 6
[purifier]
method = "diffpure"
t_star = 20
steps = 3
[ssni]
reweight = "sigmoid"
n_levels = 2
calibration_size = 16
[[attacks]]
name = "pgd"
eps = 0.3
steps = 2
step_size = 0.1
eot = 1
[[attacks]]
name = "bpda"
eps = 0.3
steps = 2
step_size = 0.1
eot = 1
[evaluate]
batch_size = 2
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(CONFIG)
    return path


def rows_of(out: Path, cfg) -> list[dict]:
    store = Store(out / "results.sqlite", cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in store.rows()]
    store.close()
    return rows


def test_resumed_run_equals_uninterrupted_run(tmp_path, config_file, tiny_weights, monkeypatch):
    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "full", tiny_weights, progress=False)
    real_run_batch, calls = runner_module.run_batch, []

    def crash_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_batch(*args)

    monkeypatch.setattr(runner_module, "run_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, tmp_path / "resumed", tiny_weights, progress=False)
    assert len(rows_of(tmp_path / "resumed", cfg)) == 2  # the first batch was committed
    monkeypatch.setattr(runner_module, "run_batch", real_run_batch)
    evaluate(cfg, tmp_path / "resumed", tiny_weights, progress=False)
    full = rows_of(tmp_path / "full", cfg)
    assert len(full) == 6 and rows_of(tmp_path / "resumed", cfg) == full
    assert all(r["t_star"] and r["score_norm"] > 0 for r in full)


def test_batch_size_does_not_change_per_sample_results(tmp_path, config_file, tiny_weights):
    cfg = load_config(config_file)
    other = replace(cfg, evaluate=replace(cfg.evaluate, batch_size=6),
                    attacks=tuple(replace(a, eot_batch=2) for a in cfg.attacks))
    assert other.hash() == cfg.hash()  # speed-only settings: a run may resume with other values
    evaluate(cfg, tmp_path / "a", tiny_weights, progress=False)
    evaluate(other, tmp_path / "b", tiny_weights, progress=False)
    a, b = rows_of(tmp_path / "a", cfg), rows_of(tmp_path / "b", other)
    for ra, rb in zip(a, b):
        assert ra["score_norm"] == pytest.approx(rb["score_norm"], rel=1e-5)
        assert {k: v for k, v in ra.items() if k != "score_norm"} == {k: v for k, v in rb.items() if k != "score_norm"}


def test_compile_option_wraps_the_diffusion_network_and_changes_no_result(tmp_path, config_file, tiny_weights,
                                                                         monkeypatch):
    compiled = []

    def fake_compile(module, **kwargs):  # inductor takes minutes on 2 cores; the wiring is what is tested here
        compiled.append((module, kwargs))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "a", tiny_weights, progress=False)
    assert not compiled
    other = replace(cfg, evaluate=replace(cfg.evaluate, compile=True))
    evaluate(other, tmp_path / "b", tiny_weights, progress=False)
    assert len(compiled) == 1 and compiled[0][1] == {"dynamic": True}
    assert type(compiled[0][0]).__name__ == "UNet"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "score_norm"} for r in rows]  # noqa: E731
    assert strip(rows_of(tmp_path / "a", cfg)) == strip(rows_of(tmp_path / "b", other))


def test_two_shards_merge_to_the_single_process_result(tmp_path, config_file, tiny_weights):
    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "one", tiny_weights, progress=False)
    for rank in (1, 0):  # rank 0 merges whatever shards exist when it finishes
        evaluate(cfg, tmp_path / "two", tiny_weights, progress=False, rank=rank, world=2)
    assert rows_of(tmp_path / "two", cfg) == rows_of(tmp_path / "one", cfg)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")
def test_torchrun_two_processes_match_one_process(tmp_path, config_file, tiny_weights):
    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "one", tiny_weights, progress=False)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29533", "-m", "ssni.cli", "evaluate",
                             "--config", str(config_file), "--out", str(tmp_path / "tr"),
                             "--weights-dir", str(tiny_weights), "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert rows_of(tmp_path / "tr", cfg) == rows_of(tmp_path / "one", cfg)
    assert (tmp_path / "tr" / "shard-1-of-2.sqlite").exists()


def test_a_store_refuses_another_config(tmp_path, config_file, tiny_weights):
    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
    other = load_config(config_file, {"data.n": 4})
    with pytest.raises(ResumeError, match="another config"):
        evaluate(other, tmp_path / "run", tiny_weights, progress=False)


def test_summary_reports_protocol_and_intervals(tmp_path, config_file, tiny_weights):
    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
    rows = rows_of(tmp_path / "run", cfg)
    s = summarize([{**r, "seconds": 0.1} for r in rows], cfg)
    assert s["scoring"] == "one evaluation on fresh randomness"
    assert s["robust"]["acc"] <= s["after_each_attack"][0]["acc"] <= s["clean"]["acc"]
    low, high = s["robust"]["ci95"]
    assert 0 <= low <= s["robust"]["acc"] <= high <= 1


class Coin(torch.nn.Module):
    """A 'defense' whose prediction alternates with the draw: correct on even draws."""

    takes_sample_ids = True

    def forward(self, x, sample_ids=None):
        return x


def test_rescore_protocols(monkeypatch):
    y = torch.tensor([1, 1])
    preds = iter([torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([1, 0])])
    monkeypatch.setattr(runner_module, "predict", lambda *a: next(preds))
    pred, ok = rescore(Coin(), torch.zeros(2, 1, 1, 1), y, torch.arange(2), "worst", 3)
    assert ok.tolist() == [False, False] and pred.tolist() == [0, 0]
    preds = iter([torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([1, 0])])
    pred, ok = rescore(Coin(), torch.zeros(2, 1, 1, 1), y, torch.arange(2), "majority", 3)
    assert ok.tolist() == [True, False]


def test_config_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict({"data": {"size": 3}})
    with pytest.raises(ConfigError, match="choose one of"):
        from_dict({"purifier": {"method": "diffusion"}})
    with pytest.raises(ConfigError, match="unknown section"):
        from_dict({"model": {}})
    assert from_dict({"attacks": [{"name": "bpda"}]}).attacks == (AttackConfig(name="bpda"),)


def test_shipped_presets_parse():
    for path in sorted(Path(__file__).parents[1].glob("configs/*.toml")):
        load_config(path)


def test_overrides_reach_sections_and_attack_entries(config_file):
    cfg = load_config(config_file, {"data.n": 3, "attacks.1.name": "adaptive", "attacks.0.eot": 4})
    assert cfg.data.n == 3 and cfg.attacks[1].name == "adaptive" and cfg.attacks[0].eot == 4
    with pytest.raises(ConfigError, match="attacks.K.key"):
        load_config(config_file, {"attacks.5.name": "pgd"})


def test_built_defense_is_in_eval_mode(config_file, tiny_weights):
    from ssni.evaluate.build import build_model, calibrate, load_models

    cfg = load_config(config_file)
    unet, classifier = load_models(cfg, tiny_weights)
    model = build_model(cfg, unet, classifier, calibrate(cfg, unet, tiny_weights))
    assert not any(m.training for m in model.modules())


def test_report_rebuilds_the_summary_from_the_folder(tmp_path, config_file, tiny_weights):
    from ssni.evaluate.report import report

    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
    text = report(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config_hash"] == cfg.hash() and summary["n"] == 6
    assert "robust (worst case)" in text and (tmp_path / "run" / "t_star.png").exists()
    with pytest.raises(ResumeError):
        report(tmp_path / "missing")
