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
from ssni.evaluate.runner import evaluate, worst_candidate
from ssni.evaluate.scoring import fresh_verdicts, robust_under
from ssni.evaluate.store import Store
from ssni.evaluate.summary import format_summary, summarize

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
rescore_draws = 3
"""


@pytest.fixture
def config_file(write_toml):
    return write_toml(CONFIG)


def rows_of(out: Path, cfg) -> list[dict]:
    store = Store(out / "results.sqlite", cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in store.rows()]
    store.close()
    return rows


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    """Discrete fields (ids, predictions, levels, verdicts) exactly; the score norm, a float sum that
    can differ in the last bits between CPUs and batch sizes, to a relative 1e-5."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra["score_norm"] == pytest.approx(rb["score_norm"], rel=1e-5)
        assert {k: v for k, v in ra.items() if k != "score_norm"} == {k: v for k, v in rb.items() if k != "score_norm"}


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
    assert len(full) == 6
    assert_same_rows(rows_of(tmp_path / "resumed", cfg), full)
    assert all(r["t_star"] and r["score_norm"] > 0 for r in full)


def test_batch_size_and_max_rows_do_not_change_per_sample_results(tmp_path, config_file, tiny_weights):
    cfg = load_config(config_file)
    other = replace(cfg, evaluate=replace(cfg.evaluate, batch_size=6, max_rows=5),
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
    assert [type(m).__name__ for m, _ in compiled] == ["UNet", "SmallCNN"]  # both networks
    assert all(kw == {"dynamic": False, "mode": None} for _, kw in compiled)  # static shapes, bucketed rows
    assert_same_rows(rows_of(tmp_path / "a", cfg), rows_of(tmp_path / "b", other))


def test_two_shards_merge_to_the_single_process_result(tmp_path, config_file, tiny_weights):
    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "one", tiny_weights, progress=False)
    for rank in (1, 0):  # rank 0 merges whatever shards exist when it finishes
        evaluate(cfg, tmp_path / "two", tiny_weights, progress=False, rank=rank, world=2)
    assert_same_rows(rows_of(tmp_path / "two", cfg), rows_of(tmp_path / "one", cfg))


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
    assert_same_rows(rows_of(tmp_path / "tr", cfg), rows_of(tmp_path / "one", cfg))
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
    assert s["scoring"] == "worst case over 3 fresh evaluations" and s["headline"] == "worst"
    assert s["robust"]["acc"] <= s["after_each_attack"][0]["acc"] <= s["clean"]["acc"]
    by = s["robust_by_protocol"]
    assert by["worst"]["acc"] <= min(by["single"]["acc"], by["majority"]["acc"])
    assert by["any_iterate"]["acc"] <= by["single"]["acc"]
    for acc in by.values():
        assert 0 <= acc["ci95"][0] <= acc["acc"] <= acc["ci95"][1] <= 1
    curve = s["robust_vs_draws"]
    assert curve["draws"] == [1, 2, 3] and curve["worst"][0] == by["single"]["acc"]
    assert all(a >= b for a, b in zip(curve["worst"], curve["worst"][1:]))  # more draws, never more robust
    for row in rows:  # every attack result keeps its raw fresh predictions
        for result in row["attacks"].values():
            assert len(result["preds"]) == 3 and isinstance(result["fooled_during"], bool)


def test_the_levels_adversarial_examples_get_are_recorded(tmp_path, config_file, tiny_weights):
    from ssni.evaluate.runner import RESCORE_DRAW, prepare_model

    cfg = load_config(config_file)
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
    rows = rows_of(tmp_path / "run", cfg)
    store = Store(tmp_path / "run" / "results.sqlite", cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    images = store.adversarial("0:pgd")
    store.close()
    attacked = [r for r in rows if "0:pgd" in r["attacks"]]
    assert attacked and set(images) == {r["sample_id"] for r in attacked}
    model = prepare_model(cfg, tiny_weights)
    ids = torch.tensor([r["sample_id"] for r in attacked])
    with torch.no_grad():  # the level SSNI gives the stored example on the first fresh draw
        info = model.explain(torch.stack([images[int(i)] for i in ids]), sample_ids=ids, draw=RESCORE_DRAW)
    assert [r["attacks"]["0:pgd"]["t_star"] for r in attacked] == info["t_star"].T.tolist()
    assert [r["attacks"]["0:pgd"]["score_norm"] for r in attacked] == pytest.approx(info["score_norm"].tolist(),
                                                                                       rel=1e-5)
    s = summarize([{**r, "seconds": 0.1} for r in rows], cfg)
    levels = [r["attacks"]["0:pgd"]["t_star"][-1] for r in attacked]
    assert s["after_each_attack"][0]["t_adv_mean"] == pytest.approx(sum(levels) / len(levels))
    assert "adversarial inputs get t*" in format_summary(s)


def test_fresh_verdicts_single_majority_worst():
    y = torch.tensor([1, 1, 1, 2])
    preds = torch.tensor([[1, 0, 0, 2],   # draw 0
                          [0, 1, 3, 2],
                          [1, 1, 1, 2]])
    v = fresh_verdicts(preds, y)
    assert v["single"].tolist() == [True, False, False, True]
    assert v["majority"].tolist() == [True, True, False, True]  # sample 2: label 1 vs 0 and 3 once each -> tie
    assert v["worst"].tolist() == [False, False, False, True]


def test_robust_under_combines_the_cascade_and_the_clean_pass():
    def row(clean, *results):
        return {"label": 1, "clean_correct": clean,
                "attacks": {f"{k}:pgd": r for k, r in enumerate(results) if r is not None}}
    rows = [row(1, {"preds": [1, 1, 0], "fooled_during": False}, {"preds": [1, 1, 1], "fooled_during": True}),
            row(1, {"preds": [1, 1, 1], "fooled_during": False}, {"preds": [1, 1, 1], "fooled_during": False}),
            row(0, None, None)]
    keys = ["0:pgd", "1:pgd"]
    assert robust_under(rows, keys, "single") == [True, True, False]
    assert robust_under(rows, keys, "worst") == [False, True, False]
    assert robust_under(rows, keys, "worst", n=2) == [True, True, False]
    assert robust_under(rows, keys, "any_iterate") == [False, True, False]
    assert robust_under(rows, keys[:1], "any_iterate") == [True, True, False]


def test_worst_candidate_keeps_the_output_with_the_fewest_correct_draws(monkeypatch):
    y = torch.tensor([1, 1])
    a, b = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    # candidate a: sample 0 always correct, sample 1 wrong once; candidate b the other way round
    table = {0.0: [torch.tensor([1, 1]), torch.tensor([1, 0])], 1.0: [torch.tensor([0, 1]), torch.tensor([1, 1])]}
    calls = {0.0: iter(table[0.0]), 1.0: iter(table[1.0])}
    monkeypatch.setattr(runner_module, "predict", lambda m, x, ids, draw: next(calls[float(x[0, 0, 0, 0])]))
    x_adv, preds = worst_candidate(None, [a, b], y, torch.arange(2), 2)
    assert x_adv[:, 0, 0, 0].tolist() == [1.0, 0.0]
    assert preds.tolist() == [[[1, 1], [1, 0]], [[0, 1], [1, 1]]]  # [K, N, B]: every candidate is scored


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
    cfg = load_config(config_file, {"data.n": 3, "attacks.1.name": "pgd", "attacks.0.eot": 4})
    assert cfg.data.n == 3 and cfg.attacks[1].name == "pgd" and cfg.attacks[0].eot == 4
    with pytest.raises(ConfigError, match="'adaptive' does not use step_size"):  # a key the attack would ignore
        load_config(config_file, {"attacks.1.name": "adaptive"})
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
    assert "robust, worst" in text and "<- headline" in text and "robust, majority" in text
    assert (tmp_path / "run" / "t_star.png").exists() and (tmp_path / "run" / "robust_vs_draws.png").exists()
    with pytest.raises(ResumeError):
        report(tmp_path / "missing")


@pytest.mark.parametrize("override,key", [("purifier.t_star='300'", "t_star"), ("data.n='twenty'", "[data] n"),
                                          ("evaluate.batch_size=0", "batch_size"), ("data.n=-5", "[data] n"),
                                          ("data.n=0", "[data] n"), ("attacks.0.eps=1.5", "eps")])
def test_bad_config_values_are_refused_before_anything_loads(config_file, override, key):
    section_key, value = override.split("=", 1)
    import tomllib

    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")) as err:
        load_config(config_file, {section_key: tomllib.loads(f"v = {value}")["v"]})
    assert "expected" in str(err.value) or "must" in str(err.value)


def test_an_empty_store_of_a_failed_run_is_taken_over(tmp_path, config_file, tiny_weights):
    cfg = load_config(config_file)
    bad = load_config(config_file, {"data.n": 4})
    (tmp_path / "run").mkdir()
    Store(tmp_path / "run" / "results.sqlite", bad.hash(), "{}").close()  # a run that died before its first batch
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)  # no row was written: the store is taken over
    assert len(rows_of(tmp_path / "run", cfg)) == 6


def test_a_second_writer_is_refused_while_the_first_holds_the_store(tmp_path):
    from ssni.evaluate.store import exclusive

    path = tmp_path / "results.sqlite"
    with exclusive(path):
        code = ("import sys; from pathlib import Path; from ssni.evaluate.store import exclusive\n"
                f"with exclusive(Path({str(path)!r})): pass")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and "is being written by process" in other.stderr
    with exclusive(path):  # released: the next run takes it
        pass


def test_out_that_is_a_file_is_an_input_error(tmp_path, config_file, tiny_weights):
    from ssni.errors import InputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        evaluate(load_config(config_file), tmp_path / "file", tiny_weights, progress=False)


def test_a_list_where_a_name_belongs_is_a_config_error_not_a_traceback():
    with pytest.raises(ConfigError, match="method"):
        from_dict({"purifier": {"method": ["diffpure"]}})


def test_auto_is_measured_only_when_there_is_work(tiny_config_file, tiny_weights, tmp_path, monkeypatch):
    """An empty shard crashed in the "auto" measurement (it probed 0 images), and a finished folder was
    measured again on every rerun, its recorded speed overwritten with the fallback."""
    auto = load_config(tiny_config_file, {"data.n": 1, "evaluate.batch_size": "auto", "attacks.0.eot_batch": "auto"})
    measured = []
    choose = runner_module.choose_speed
    monkeypatch.setattr(runner_module, "choose_speed", lambda *a, **k: measured.append(1) or choose(*a, **k))
    evaluate(auto, tmp_path / "shard", tiny_weights, progress=False, rank=1, world=2)  # 1 sample: shard 1 is empty
    assert measured == []
    evaluate(auto, tmp_path / "run", tiny_weights, progress=False)
    recorded = (tmp_path / "run" / "config.json").read_text()
    evaluate(auto, tmp_path / "run", tiny_weights, progress=False)  # finished: nothing to measure or rewrite
    assert measured == [1] and (tmp_path / "run" / "config.json").read_text() == recorded


def test_report_reads_a_folder_whose_hash_an_older_ssni_made(tiny_config_file, tiny_weights, tmp_path):
    """A release that moves a key into the speed-only set changes every config hash: resuming such a folder
    is refused (the rows might not match the config), but `ssni report` still reads what it holds."""
    import sqlite3

    from ssni.evaluate.report import report

    cfg = load_config(tiny_config_file, {"data.n": 2})
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as db:
        db.execute("UPDATE meta SET value = 'made-by-an-older-ssni' WHERE key = 'config_hash'")
    assert "clean" in report(tmp_path / "run").lower()
    with pytest.raises(ResumeError, match="older ssni"):
        evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
