import subprocess
import sys

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
    assert len(lines) == 1 and lines[0].startswith("error:") and "ssni train score" in lines[0]


def test_out_of_range_option_is_rejected_with_exit_2():
    result = runner.invoke(app, ["demo", "--eps", "3"])
    assert result.exit_code == 2


def test_help_lists_commands_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output and "train" in result.output
    result = runner.invoke(app, ["demo", "--help"])
    assert "ssni demo --quick" in result.output
