import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ssni.cli import app

runner = CliRunner()


def run_cli(*args):
    """Run the real entry point (error handling included) in a subprocess."""
    return subprocess.run([sys.executable, "-c", "from ssni.cli import main; main()", *args],
                          capture_output=True, text=True)


def test_user_errors_print_one_line_and_exit_2(tmp_path):
    result = run_cli("demo", "--quick", "--weights-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "ship with the package" in lines[0]
    assert "drop --weights-dir" in lines[0] and not (tmp_path / "o").exists()  # refused before --out is made


def test_out_of_range_option_is_rejected_with_exit_2():
    result = runner.invoke(app, ["demo", "--eps", "3"])
    assert result.exit_code == 2


def test_help_lists_commands_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output and "train" in result.output
    result = runner.invoke(app, ["demo", "--help"])
    assert "ssni demo --quick" in result.output


def test_training_never_overwrites_a_model_without_force(tmp_path):
    from ssni.checkpoints.registry import default_weights_dir

    shipped = default_weights_dir() / "mnist-unet.safetensors"
    before = shipped.read_bytes()
    result = run_cli("train", "score", "--steps", "1", "--weights-dir", str(default_weights_dir()))
    assert result.returncode == 2 and "--force" in result.stderr and shipped.read_bytes() == before
    result = runner.invoke(app, ["train", "score", "--help"])
    assert "trained" in result.output  # the default is a new folder, not the shipped weights/


def test_a_bad_config_value_is_one_error_line_naming_the_key(tmp_path):
    result = run_cli("evaluate", "--config", str(Path(__file__).parents[1] / "configs/mnist-diffpure-ssni-n.toml"), "--out", str(tmp_path / "o"),
                     "--set", "purifier.t_star=\"300\"")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error:") and "t_star" in lines[0] and "'300'" in lines[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_help_and_models_are_readable():
    result = runner.invoke(app, ["evaluate", "--help"], terminal_width=80)
    assert "<bool>" not in result.output and "--sanity-n" in result.output and "[default: 16" in result.output
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "test_acc 0.988" in result.output
    assert "0.0076696380227804185" not in result.output  # no 17-digit floats


def test_demo_help_states_the_defaults_the_demo_uses():
    """`ssni demo --help` writes its defaults into the text: they must be DemoConfig's."""
    import re
    from dataclasses import fields

    from ssni.demo import QUICK, DemoConfig

    result = runner.invoke(app, ["demo", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    defaults = {f.name: f.default for f in fields(DemoConfig)}
    stated = {"pgd-steps": "pgd_steps", "eot": "eot", "draws": "rescore_draws", "t-star": "t_star",
              "batch-size": "batch_size", "eps": "eps"}
    for option, name in stated.items():
        match = re.search(rf"--{option} .*?\(default ([0-9.]+)", text)
        assert match and float(match.group(1)) == defaults[name], option
    assert f"default {defaults['n_test']}, quick {QUICK['n_test']}" in text
