"""One registry per kind: every entry builds from a config and runs; a new entry is one registry line."""

from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch

from ssni.errors import ConfigError
from ssni.evaluate import load_config
from ssni.evaluate.build import build_attack, build_model, calibrate, load_models
from ssni.evaluate.config import AttackConfig, PurifierConfig, from_dict
from ssni.evaluate.registries import ATTACKS, PURIFIERS, SHARED_ATTACK_KEYS
from ssni.reweight import REWEIGHTS

def _defense(tiny_config_file, tiny_weights, purifier: PurifierConfig | None = None):
    cfg = load_config(tiny_config_file)
    cfg = replace(cfg, purifier=purifier or cfg.purifier)
    unet, classifier = load_models(cfg, tiny_weights)
    return cfg, build_model(cfg, unet, classifier, calibrate(cfg, unet, tiny_weights))


@pytest.mark.parametrize("method", sorted(PURIFIERS))
def test_every_registered_purifier_builds_with_its_settings_and_purifies_mixed_levels(method, tiny_config_file,
                                                                                     tiny_weights):
    settings = PURIFIERS[method].settings()  # the entry's defaults
    cfg, defense = _defense(tiny_config_file, tiny_weights, PurifierConfig(method=method, steps=2))
    assert cfg.purifier.settings == settings
    for name, value in asdict(settings).items():  # the builder received every setting
        assert getattr(defense.purifier, name) == value
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        logits = defense(x, draw=0)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert defense.explain(x, draw=0)["t_star"].shape[-1] == 3


@pytest.mark.parametrize("method", sorted(PURIFIERS))
def test_the_readme_lists_every_purifier_table_with_its_keys(method):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(line for line in readme.replace("\n", " ").split("; ") if f"`[purifier.{method}]`" in line)
    assert all(f"`{f.name}`" in line for f in fields(PURIFIERS[method].settings))


@pytest.mark.parametrize("method", sorted(PURIFIERS))
def test_every_purifier_table_round_trips_and_its_keys_belong_to_it_alone(method):
    entry = PURIFIERS[method]
    settings = entry.settings()
    assert entry.settings.__dataclass_params__.frozen  # a config cannot change under a running evaluation
    cfg = from_dict({"purifier": {"method": method, method: asdict(settings)}})
    assert cfg.purifier.settings == settings and from_dict(cfg.to_dict()) == cfg
    for other in sorted(set(PURIFIERS) - {method}):
        with pytest.raises(ConfigError, match=rf"\[purifier\.{other}\] is given but method = '{method}'"):
            from_dict({"purifier": {"method": method, other: {}}})
        for key in sorted({f.name for f in fields(PURIFIERS[other].settings)} - {f.name for f in fields(settings)}):
            with pytest.raises(ConfigError, match=rf"{key} does not apply to method = '{method}'.*{other}"):
                from_dict({"purifier": {"method": method, key: getattr(PURIFIERS[other].settings(), key)}})


@pytest.mark.parametrize("kind", sorted(REWEIGHTS))
def test_every_registered_reweighting_is_accepted_by_the_config(kind):
    assert from_dict({"ssni": {"reweight": kind}}).ssni.reweight == kind


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_registered_attack_builds_from_its_config(name, tiny_config_file, tiny_weights):
    _, defense = _defense(tiny_config_file, tiny_weights)
    attack, target = build_attack(AttackConfig(name=name, steps=1, eot=1), defense, seed=0)
    assert callable(attack) and isinstance(target, torch.nn.Module)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_accepts_the_keys_it_reads_and_refuses_the_others(name):
    defaults = asdict(AttackConfig(name=name))
    reads = ATTACKS[name].reads
    cfg = from_dict({"attacks": [{k: v for k, v in defaults.items() if k in reads}]})
    assert cfg.attacks[0] == AttackConfig(name=name) and from_dict(cfg.to_dict()) == cfg
    for key in sorted(set(defaults) - reads):
        with pytest.raises(ConfigError, match=rf"name = '{name}' does not use {key} \(read by"):
            from_dict({"attacks": [{"name": name, key: defaults[key]}]})


def test_every_attack_key_is_read_by_some_attack():
    read = SHARED_ATTACK_KEYS.union(*(entry.reads for entry in ATTACKS.values()))
    assert read == {f.name for f in fields(AttackConfig)}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_takes_the_gradient_modes_of_its_entry_and_refuses_the_others(name):
    for mode in ("exact", "surrogate", "bpda"):
        values = {"name": name, "gradient": mode}
        if mode in ATTACKS[name].gradients:
            assert from_dict({"attacks": [values]}).attacks[0].gradient == mode
        else:
            with pytest.raises(ConfigError, match=f"attack '{name}' cannot take gradient = '{mode}'"):
                from_dict({"attacks": [values]})


def test_unregistered_names_are_errors_that_list_the_registered_ones():
    with pytest.raises(ConfigError, match="choose one of"):
        from_dict({"purifier": {"method": "diffpur"}})
    with pytest.raises(ConfigError, match="apgd"):
        from_dict({"attacks": [{"name": "fgsm"}]})
