"""One registry per kind: every entry builds from a config and runs; a new entry is one registry line."""

import json
from dataclasses import dataclass, replace

import pytest
import torch
from typer.testing import CliRunner

from ssni.cli import app
from ssni.errors import ConfigError
from ssni.evaluate import load_config
from ssni.evaluate.build import build_attack, build_model, calibrate, load_models
from ssni.evaluate.config import AttackConfig, from_dict
from ssni.evaluate.registries import ATTACKS, PURIFIERS
from ssni.purifiers import DiffPure
from ssni.reweight import REWEIGHTS

CONFIG = """
[data]
n = 2
[purifier]
method = "diffpure"
t_star = 20
steps = 2
[ssni]
reweight = "sigmoid"
n_levels = 2
calibration_size = 8
[[attacks]]
name = "pgd"
steps = 1
eot = 1
[evaluate]
batch_size = 2
rescore_draws = 2
"""


@pytest.fixture
def config_file(tmp_path):
    (tmp_path / "exp.toml").write_text(CONFIG)
    return tmp_path / "exp.toml"


def _defense(config_file, tiny_weights, **purifier):
    cfg = load_config(config_file)
    cfg = replace(cfg, purifier=replace(cfg.purifier, **purifier))
    unet, classifier = load_models(cfg, tiny_weights)
    return cfg, build_model(cfg, unet, classifier, calibrate(cfg, unet, tiny_weights))


@pytest.mark.parametrize("method", sorted(PURIFIERS))
def test_every_registered_purifier_builds_and_purifies_mixed_levels(method, config_file, tiny_weights):
    cfg, defense = _defense(config_file, tiny_weights, method=method, rounds=2, levels=(5, 10))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        logits = defense(x, draw=0)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert defense.explain(x, draw=0)["t_star"].shape[-1] == 3


@pytest.mark.parametrize("kind", sorted(REWEIGHTS))
def test_every_registered_reweighting_is_accepted_by_the_config(kind):
    assert from_dict({"ssni": {"reweight": kind}}).ssni.reweight == kind


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_registered_attack_builds_from_its_config(name, config_file, tiny_weights):
    _, defense = _defense(config_file, tiny_weights)
    attack, target = build_attack(AttackConfig(name=name, steps=1, eot=1), defense, seed=0)
    assert callable(attack) and isinstance(target, torch.nn.Module)


def test_unregistered_names_are_errors_that_list_the_registered_ones():
    with pytest.raises(ConfigError, match="choose one of"):
        from_dict({"purifier": {"method": "diffpur"}})
    with pytest.raises(ConfigError, match="apgd"):
        from_dict({"attacks": [{"name": "fgsm"}]})


@dataclass
class HalfwayDiffPure(DiffPure):
    """A new purifier written by a user: DiffPure that stops halfway (scratch, for this test)."""

    def default_levels(self, batch: int):
        return super().default_levels(batch) // 2


def test_a_new_purifier_is_one_registry_line_and_runs_through_ssni_evaluate(config_file, tiny_weights, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setitem(PURIFIERS, "halfway", lambda unet, p, common: HalfwayDiffPure(unet, t_star=p.t_star, **common))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["evaluate", "--config", str(config_file), "--out", str(out), "--no-progress",
                                      "--weights-dir", str(tiny_weights), "--set", "purifier.method=halfway",
                                      "--set", "ssni.reweight=none"])
    assert result.exit_code == 0, result.output
    assert "robust, worst" in result.output
    assert '"method": "halfway"' in (out / "config.json").read_text()
    assert json.loads((out / "summary.json").read_text())["t_mean"] == 10  # the new purifier's own levels
