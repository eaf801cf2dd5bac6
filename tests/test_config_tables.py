"""Per-method purifier tables and per-attack keys: a key lands in one place or is an error that says where
it belongs; the CLI refuses it with one line before anything loads."""

import subprocess
import sys
from pathlib import Path

import pytest

from ssni.errors import ConfigError
from ssni.evaluate import load_config
from ssni.evaluate.config import from_dict, purifier_config
from ssni.purifiers import DiffPureSettings, GDMPSettings, GNSSettings

GDMP_TOML = """
[purifier]
method = "gdmp"
steps = 4
[purifier.gdmp]
t_star = 30
rounds = 3
"""


@pytest.fixture
def gdmp_file(write_toml):
    return write_toml(GDMP_TOML, "gdmp.toml")


def test_defaults_are_the_flat_config_s_defaults():
    assert from_dict({}).purifier.settings == DiffPureSettings(t_star=150)
    assert from_dict({"purifier": {"method": "gdmp"}}).purifier.settings == GDMPSettings(
        t_star=150, rounds=4, guide_scale=60000.0, guide_batch=100, reference_compat=False)
    assert from_dict({"purifier": {"method": "gns"}}).purifier.settings.levels == (30, 30, 30, 30, 50, 50, 125, 125)
    assert from_dict({"purifier": {"method": "none"}}).purifier.settings is None


def test_a_flat_key_and_the_table_land_in_the_same_settings_object():
    flat = from_dict({"purifier": {"method": "gns", "levels": [3, 6], "steps": 2}})
    table = from_dict({"purifier": {"method": "gns", "steps": 2, "gns": {"levels": [3, 6]}}})
    assert flat == table and flat.hash() == table.hash() and flat.purifier.settings == GNSSettings(levels=(3, 6))
    assert purifier_config("gns", levels=(3, 6), steps=2) == flat.purifier


def test_overrides_reach_the_table_and_replace_a_key_where_the_file_holds_it(gdmp_file):
    cfg = load_config(gdmp_file, {"purifier.gdmp.rounds": 2, "purifier.t_star": 40, "purifier.steps": 5})
    assert cfg.purifier.settings == GDMPSettings(t_star=40, rounds=2) and cfg.purifier.steps == 5
    assert load_config(gdmp_file, {"purifier.guide_batch": 7}).purifier.settings.guide_batch == 7  # not in the file
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(gdmp_file, {"purifier.": 3})


@pytest.mark.parametrize("purifier,message", [
    ({"method": "diffpure", "rounds": 2},
     r"\[purifier\] rounds does not apply to method = 'diffpure'.*\[purifier.gdmp\]"),
    ({"method": "gns", "t_star": 20},
     r"t_star does not apply to method = 'gns'.*\[purifier.diffpure\] or \[purifier.gdmp\]"),
    ({"method": "none", "levels": [3]}, r"levels does not apply to method = 'none'.*\[purifier.gns\]"),
    ({"method": "diffpure", "diffpure": {"rounds": 2}}, r"\[purifier.diffpure\] rounds does not apply to method"),
    ({"method": "diffpure", "gdmp": {"rounds": 2}}, r"\[purifier.gdmp\] is given but method = 'diffpure'"),
    ({"method": "gdmp", "t_star": 20, "gdmp": {"t_star": 30}}, r"\['t_star'\] given both in \[purifier\] and in"),
    ({"method": "diffpure", "tstar": 20}, r"unknown key\(s\) \['tstar'\] in \[purifier\].*\[purifier.diffpure\]"),
    ({"method": "diffpure", "diffpure": {"tstar": 20}}, r"unknown key\(s\) \['tstar'\] in \[purifier.diffpure\]"),
])
def test_a_key_in_the_wrong_place_is_an_error_that_says_where_it_belongs(purifier, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"purifier": purifier})


@pytest.mark.parametrize("method,key,bad,good", [("diffpure", "t_star", 1001, 1000), ("diffpure", "t_star", 0, 1),
                                                 ("gdmp", "rounds", 101, 100), ("gdmp", "guide_batch", 0, 1),
                                                 ("gdmp", "guide_scale", -1.0, 0.0), ("gns", "levels", [0, 5], [1, 5])])
def test_method_keys_are_range_checked_flat_and_in_their_table(method, key, bad, good):
    for where in ("flat", "table"):
        place = (lambda v: {key: v}) if where == "flat" else (lambda v: {method: {key: v}})
        with pytest.raises(ConfigError, match=rf"\[purifier.{method}\] {key} = .*expected"):
            from_dict({"purifier": {"method": method, **place(bad)}})
        settings = from_dict({"purifier": {"method": method, **place(good)}}).purifier.settings
        assert getattr(settings, key) == (tuple(good) if isinstance(good, list) else good)


def test_the_saved_config_reads_back_and_a_method_setting_changes_the_hash():
    cfg = from_dict({"purifier": {"method": "gdmp", "gdmp": {"rounds": 2}},
                     "attacks": [{"name": "apgd", "loss": "ce"}, {"name": "autoattack", "version": "apgd-ce"}]})
    assert from_dict(cfg.to_dict()) == cfg and from_dict(cfg.to_dict()).hash() == cfg.hash()
    assert set(cfg.to_dict()["purifier"]["gdmp"]) == {"t_star", "rounds", "guide_scale", "guide_batch",
                                                      "reference_compat"}
    assert "step_size" not in str(cfg.to_dict()["attacks"]) and "levels" not in cfg.to_dict()["purifier"]
    other = from_dict({"purifier": {"method": "gdmp", "gdmp": {"rounds": 3}}, "attacks": cfg.to_dict()["attacks"]})
    assert other.hash() != cfg.hash()


@pytest.mark.parametrize("attack,key", [({"name": "pgd", "loss": "ce"}, "loss"),
                                        ({"name": "apgd", "version": "rand"}, "version"),
                                        ({"name": "pgd", "score_target": "mu"}, "score_target"),
                                        ({"name": "autoattack", "eot_batch": 2}, "eot_batch"),
                                        ({"name": "bpda", "surrogate_steps": 5}, "surrogate_steps")])
def test_an_attack_key_the_attack_does_not_read_is_an_error_naming_both(attack, key):
    with pytest.raises(ConfigError, match=rf"#1 name = '{attack['name']}' does not use {key} \(read by"):
        from_dict({"attacks": [{"name": "pgd"}, attack]})


def test_the_cli_refuses_a_misplaced_key_with_one_line_before_anything_loads(tmp_path):
    config = Path(__file__).parents[1] / "configs" / "mnist-diffpure-ssni-n.toml"
    result = subprocess.run([sys.executable, "-c", "from ssni.cli import main; main()", "evaluate", "--config",
                             str(config), "--out", str(tmp_path / "o"), "--set", "purifier.rounds=2"],
                            capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and not (tmp_path / "o").exists()
    assert lines[0].startswith("error: [purifier] rounds does not apply to method = 'diffpure'")
    assert "[purifier.gdmp]" in lines[0]
