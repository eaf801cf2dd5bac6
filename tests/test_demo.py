"""A tiny end-to-end demo run: real MNIST images, tiny random-init models in a temp weights folder."""

import json

import pytest

from ssni.demo import demo_config, run_demo
from ssni.errors import CheckpointError


def test_tiny_demo_writes_results_and_figures(tmp_path, tiny_weights):
    cfg = demo_config(True, n_test=4, pgd_steps=2, eot=1, steps=2, t_star=20, n_levels=2,
                      calibration_size=16, batch_size=4, eps=0.3, rescore_draws=3)
    out = tmp_path / "out"
    results = run_demo(cfg, out, tiny_weights, progress=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved["dataset"] == "mnist-5k" and saved["n_test"] == 4
    assert [r["method"] for r in saved["rows"]] == ["undefended", "DiffPure", "DiffPure + SSNI-L",
                                                     "DiffPure + SSNI-N"]
    assert [r["ssni"] for r in saved["rows"]] == [None, None, "linear", "sigmoid"]
    for row in saved["rows"]:
        assert 0 <= row["clean_acc"] <= 1 and 0 <= row["robust_acc"] <= 1 and row["seconds"] > 0
        by = row["robust_by_protocol"]
        assert row["robust_acc"] == by["worst"]["acc"] <= min(by["single"]["acc"], by["majority"]["acc"])
        assert row["robust_vs_draws"]["draws"] == [1, 2, 3]
    assert saved["rows"][1]["t_mean"] == 20 and saved["rows"][1]["t_std"] == 0
    assert 1 <= saved["rows"][3]["t_mean"] <= 20 - 1 + 5
    assert saved["rows"][0]["clean_acc"] == 1.0  # the real classifier on 4 real digits
    assert saved["rows"][0]["robust_acc"] < 1.0  # and PGD breaks it
    assert 0 <= saved["auroc_score_norm"] <= 1 and results["attack"]["eps"] == 0.3
    table = (out / "table.txt").read_text()
    assert "robust worst" in table and "robust single" in table and "[" in table  # intervals in the table
    for name in ("score_norms.png", "t_star.png", "purification.png", "table.txt", "robust_vs_draws.png",
                 "runs/diffpure-ssni-n/calibration.json", "runs/diffpure/results.sqlite"):
        assert (out / name).stat().st_size > 0
    assert {p.name for p in tmp_path.iterdir()} == {"weights", "out"}  # nothing written elsewhere


def test_demo_without_models_for_the_dataset_says_how_to_train_them(tmp_path, tiny_weights):
    with pytest.raises(CheckpointError, match="ssni train score --dataset fashion-mnist"):
        run_demo(demo_config(True, dataset="fashion-mnist"), tmp_path / "out", tiny_weights, progress=False)
