"""The edges a new user's tour found (issue 23): each gives one clear error, a warning, or a correct result.

CLI cases go through the real entry point (``ssni.cli.main``: the ``error:`` line, exit 2 and the
Ctrl-C message are made there); library cases raise an :class:`ssni.errors.SSNIError` subclass.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssni.cli import main
from ssni.errors import CheckpointError, InputError, ResumeError
from ssni.folders import OWNER_FILE, claim, owner, read_json

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "mnist-diffpure-ssni-n.toml"


def run_ssni(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``ssni ARGS`` through the console entry point; return (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ssni", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def one_error(status: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])


# --- config shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    ('[data]\nn = 2\n[attacks]\nname = "pgd"\n', ["[attacks]", "[[attacks]]"]),
    ('data = 5\n[purifier]\nmethod = "diffpure"\n', ["data = 5", "[data]"]),
    ("", ["is empty", "configs/"]),
    ("[data]\nn = -5\n", ["n = -5"]),  # checked although --limit replaces it
    ('[data]\nn = "two"\n', ["n = 'two'"]),
])
def test_config_shapes_and_values_are_one_error_line(monkeypatch, capsys, write_toml, tmp_path, text, words):
    status, _, err = run_ssni(monkeypatch, capsys, "evaluate", "--config", write_toml(text), "--out", tmp_path / "o",
                          "--limit", "2")
    one_error(status, err, *words)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_config_without_attacks_says_which_attack_it_uses(write_toml):
    from ssni.evaluate import load_config

    notes: list[str] = []
    cfg = load_config(write_toml("[data]\nn = 2\n"), None, notes)
    assert len(notes) == 1 and "no [[attacks]]" in notes[0] and f"eps {cfg.attacks[0].eps}" in notes[0]
    notes.clear()
    load_config(DEMO_CONFIG, None, notes)
    assert notes == []


# --- output folders -----------------------------------------------------------------------------

def test_a_folder_of_one_command_is_refused_by_the_other(monkeypatch, capsys, tiny_config_file, tmp_path):
    purified = tmp_path / "purified"  # a folder ssni purify wrote before the marker existed
    purified.mkdir()
    (purified / "purify.csv").write_text("file,score_norm,t_star,prediction\n")
    (purified / "config.json").write_text('{"hash": "abc"}\n')
    status, _, err = run_ssni(monkeypatch, capsys, "evaluate", "--config", tiny_config_file, "--out", purified)
    one_error(status, err, "ssni purify", "new --out")
    assert (purified / "config.json").read_text() == '{"hash": "abc"}\n'
    assert owner(purified) == "purify"

    evaluated = claim(tmp_path / "evaluated", "evaluate")
    (evaluated / "config.json").write_text("{}\n")
    digits = tmp_path / "in"
    digits.mkdir()
    from PIL import Image
    Image.new("L", (28, 28)).save(digits / "a.png")
    status, _, err = run_ssni(monkeypatch, capsys, "purify", digits, "--out", evaluated)
    one_error(status, err, "ssni evaluate")
    assert (evaluated / "config.json").read_text() == "{}\n" and not (evaluated / "purify.csv").exists()
    status, _, err = run_ssni(monkeypatch, capsys, "report", purified)
    one_error(status, err, "ssni purify")


def test_claim_refuses_files_and_folders_it_cannot_write(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        claim(tmp_path / "file", "purify")
    with pytest.raises(InputError, match="cannot write into"):
        claim(tmp_path / "file" / "sub", "purify")  # a file where a folder would go
    assert claim(tmp_path / "new" / "deep", "purify").is_dir()
    assert (tmp_path / "new" / "deep" / OWNER_FILE).read_text() == "purify\n"
    assert claim(tmp_path / "new" / "deep", "purify")  # its own folder again: fine


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_parent_is_one_error(monkeypatch, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    status, _, err = run_ssni(monkeypatch, capsys, "evaluate", "--config", DEMO_CONFIG, "--out", locked / "o",
                          "--limit", "1")
    one_error(status, err, "cannot write into")


def test_purify_out_a_file_or_under_a_file_is_one_error(monkeypatch, capsys, tmp_path):
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "in" / "a.png")
    (tmp_path / "afile").write_text("x")
    for out, words in ((tmp_path / "afile", ["is a file"]), (tmp_path / "afile" / "sub", ["cannot write into"])):
        status, _, err = run_ssni(monkeypatch, capsys, "purify", tmp_path / "in", "--out", out)
        one_error(status, err, *words)


def test_bench_refuses_a_folder_before_it_runs(monkeypatch, capsys, tmp_path):
    import ssni.bench

    monkeypatch.setattr(ssni.bench, "run_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    status, _, err = run_ssni(monkeypatch, capsys, "bench", "--out", tmp_path)
    one_error(status, err, "is a folder")


# --- report -------------------------------------------------------------------------------------

@pytest.fixture
def empty_run(tiny_config_file, tmp_path) -> Path:
    """An evaluate folder whose store has no rows yet."""
    from ssni.evaluate import load_config
    from ssni.evaluate.store import Store

    cfg = load_config(tiny_config_file)
    out = claim(tmp_path / "run", "evaluate")
    Store(out / "results.sqlite", cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True)).close()
    (out / "config.json").write_text(json.dumps({"hash": cfg.hash(), **cfg.to_dict()}))
    return out


def test_a_report_of_no_rows_says_so_and_writes_strict_json(monkeypatch, capsys, empty_run):
    status, out, _ = run_ssni(monkeypatch, capsys, "report", empty_run)
    assert status == 0 and "no samples yet" in out and "nan" not in out.lower()

    def refuse(constant):
        raise AssertionError(f"{constant} in summary.json")

    summary = json.loads((empty_run / "summary.json").read_text(), parse_constant=refuse)
    assert summary["n"] == 0 and summary["clean"]["acc"] is None


def test_a_damaged_config_json_is_one_error(monkeypatch, capsys, empty_run):
    (empty_run / "config.json").write_text("{not json")
    status, _, err = run_ssni(monkeypatch, capsys, "report", empty_run)
    one_error(status, err, "config.json is damaged")
    with pytest.raises(ResumeError, match="damaged"):
        read_json(empty_run / "config.json")


# --- convert, fetch, models ---------------------------------------------------------------------

def test_convert_of_a_missing_file_is_one_error(monkeypatch, capsys, tmp_path):
    status, _, err = run_ssni(monkeypatch, capsys, "convert", tmp_path / "none.pkl", "--allow-pickle")
    one_error(status, err, "cannot read", "none.pkl")


def test_code_hidden_in_a_tensor_storage_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    class Storage:
        def __reduce__(self):
            import torch.storage
            return torch.storage._load_from_bytes, (pickle.dumps(Evil()),)

    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"ema": Storage()}, handle)
    status, _, err = run_ssni(monkeypatch, capsys, "convert", tmp_path / "evil.pkl", "--allow-pickle")
    one_error(status, err, "not plain tensor data", "nothing in it was run")
    assert "weights_only=False" not in err and not marker.exists()


def test_fetching_a_shipped_model_says_there_is_nothing_to_download(monkeypatch, capsys, tmp_path):
    from ssni.checkpoints.fetch import fetch_public

    status, out, _ = run_ssni(monkeypatch, capsys, "fetch", "mnist-unet", "--weights-dir", tmp_path)
    assert status == 0 and "shipped with the package" in out and "nothing to download" in out
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="shipped with the package"):
        fetch_public("mnist-unet", tmp_path)


def test_models_with_a_weights_dir_lists_the_shipped_models_too(monkeypatch, capsys, tiny_weights):
    status, out, _ = run_ssni(monkeypatch, capsys, "models", "--weights-dir", tiny_weights)
    assert status == 0
    shipped, rest = out.split(f"in {tiny_weights}", 1)
    assert "test_acc 0.988" in shipped and "mnist-unet" in shipped  # the shipped list, with its metrics
    trained, public = rest.split("public", 1)
    assert "mnist-unet" in trained and "mnist-cnn" in trained and "cifar10-wrn-28-10" in public


def test_the_missing_model_hint_names_only_what_is_missing():
    from dataclasses import replace

    from ssni.checkpoints.registry import default_weights_dir
    from ssni.evaluate import load_config
    from ssni.evaluate.build import check_models

    cfg = load_config(DEMO_CONFIG)
    with pytest.raises(CheckpointError) as err:
        check_models(replace(cfg, models=replace(cfg.models, classifier="mnist-cnnx")), default_weights_dir())
    assert "train classifier --dataset mnist-5k --name mnist-cnnx" in str(err.value)
    assert "train score" not in str(err.value) and "mnist-unet" not in str(err.value)


# --- commands that failed late ------------------------------------------------------------------

def test_demo_refuses_the_train_split_before_it_runs(monkeypatch, capsys, tmp_path):
    status, _, err = run_ssni(monkeypatch, capsys, "demo", "--split", "train", "--out", tmp_path / "d")
    one_error(status, err, "--split 'train'", "test or val")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("extra,words", [(["--attack", "xyz"], ["xyz", "apgd"]), (["--ladder", ""], ["empty"])])
def test_converge_refuses_unknown_attacks_and_an_empty_ladder(monkeypatch, capsys, tiny_config_file, tmp_path,
                                                             extra, words):
    status, _, err = run_ssni(monkeypatch, capsys, "converge", "--config", tiny_config_file, "--out", tmp_path / "c",
                          *extra)
    one_error(status, err, *words)
    assert not (tmp_path / "c").exists()


# --- library calls ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_defense():
    from ssni import Defense, DiffPure, load_named

    return Defense(load_named("mnist-cnn"), DiffPure(load_named("mnist-unet"), t_star=20, steps=2))


def test_a_named_models_defense_checks_the_image_size(mnist_defense):
    with pytest.raises(InputError, match="28x28"):
        mnist_defense(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_inputs_give_the_float32_result(mnist_defense, dtype):
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        assert torch.equal(mnist_defense(x, draw=0), mnist_defense(x.float(), draw=0))


# --- Ctrl-C, file modes, help -------------------------------------------------------------------

def test_ctrl_c_says_what_was_kept_and_how_to_resume(monkeypatch, capsys, tmp_path):
    from PIL import Image

    import ssni.purify_folder

    (tmp_path / "in").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "in" / "a.png")

    def interrupted(cfg, source, out, *args):
        claim(out, "purify")
        (out / "purify.csv").write_text("file,score_norm,t_star,prediction\na.png,1.0,5,3\nb.png,1.0,5,3\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(ssni.purify_folder, "purify_folder", interrupted)
    status, _, err = run_ssni(monkeypatch, capsys, "purify", tmp_path / "in", "--out", tmp_path / "out")
    assert status == 130
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: 2 image(s)") and str(tmp_path / "out" / "purify.csv") in line
    assert "run the same command again to resume" in line


def test_weights_are_written_with_the_umask_not_0600(tmp_path):
    from ssni.weights_io import save_weights

    mask = os.umask(0o027)
    try:
        save_weights(tmp_path / "w.safetensors", torch.nn.Linear(2, 2))
    finally:
        os.umask(mask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640


def test_train_help_describes_batch_size_lr_and_seed():
    from typer.testing import CliRunner

    from ssni.cli import app

    text = " ".join(CliRunner().invoke(app, ["train", "score", "--help"], terminal_width=200).output.split())
    assert "training images per optimiser step" in text and "learning rate" in text and "seeds the initial" in text


def test_help_does_not_import_torch():
    code = ("import sys\nfrom ssni.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_name_score_norm_stays_the_function():
    code = "import ssni.defense, ssni.score_norm, ssni\nprint(callable(ssni.score_norm), ssni.Defense.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "Defense"]


@pytest.mark.parametrize("path,forbidden", [("src/ssni/denoisers/edm.py", "checkpoints"),
                                            ("src/ssni/evaluate/registries.py", "config")])
def test_the_two_import_cycles_stay_broken(path, forbidden):
    """denoisers/edm.py no longer reaches into checkpoints/, registries.py no longer imports config.py."""
    tree = ast.parse((ROOT / path).read_text())
    modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in modules if forbidden in m.split(".")], modules



def test_a_permission_error_while_claiming_is_one_error(monkeypatch, tmp_path):
    _denied_for(monkeypatch, OWNER_FILE, "write_text", PermissionError(13, "Permission denied"))
    with pytest.raises(InputError, match="cannot write into .*Permission denied"):
        claim(tmp_path / "out", "evaluate")


def test_redirected_progress_is_plain_lines():
    import io

    from ssni.progress import PlainProgress, tqdm

    log = io.StringIO()
    bar = tqdm(total=20, initial=4, desc="evaluate[0]", unit="img", file=log)
    assert isinstance(bar, PlainProgress)
    for _ in range(16):
        bar.update(1)
    bar.close()
    for _ in tqdm(range(50), desc="PGD", leave=False, file=log):  # a nested bar that vanishes: nothing
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert [line.split(",")[0] for line in lines] == [f"evaluate[0]: {n}/20 img ({5 * n}%)" for n in range(6, 21, 2)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = tqdm(total=3, file=Terminal())
    assert not isinstance(bar, PlainProgress)
    bar.close()


# --- third pass (issue 23): folders of demo, sweep, fetch and train; flags over --set; notes and hints -----

def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_demo_claims_its_folder_before_it_runs(monkeypatch, capsys, tmp_path):
    import ssni.demo
    from ssni.demo import DemoConfig

    monkeypatch.setattr(ssni.demo, "evaluate", lambda *a, **k: pytest.fail("the demo ran"))
    (tmp_path / "afile").write_text("x")
    evaluated = claim(tmp_path / "evaluated", "evaluate")
    (evaluated / "results.sqlite").write_text("")
    before = _listing(tmp_path)
    for out, words in ((tmp_path / "afile", ["--out", "afile is a file"]),
                       (tmp_path / "afile" / "d", ["cannot write into", str(tmp_path / "afile" / "d")]),
                       (evaluated, [str(evaluated), "ssni evaluate", "new --out"])):
        status, _, err = run_ssni(monkeypatch, capsys, "demo", "--quick", "--out", out)
        one_error(status, err, *words)
    assert _listing(tmp_path) == before and (tmp_path / "afile").read_text() == "x"
    with pytest.raises(InputError, match="holds the results of `ssni evaluate`"):  # the library call claims it
        ssni.demo.run_demo(DemoConfig(), evaluated)
    assert _listing(tmp_path) == before


def test_demo_takes_over_its_old_folder_and_says_what_ctrl_c_keeps(monkeypatch, capsys, tmp_path):
    import ssni.demo

    old = tmp_path / "demo"  # written by a demo before the marker existed, stopped in its first method
    (old / "runs" / "undefended").mkdir(parents=True)
    (old / "runs" / "undefended" / "results.sqlite").write_text("")
    assert owner(old) == "demo" and owner(old / "runs" / "undefended") == "evaluate"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ssni.demo, "evaluate", interrupted)
    status, _, err = run_ssni(monkeypatch, capsys, "demo", "--quick", "--out", old)
    assert status == 130 and (old / OWNER_FILE).read_text() == "demo\n"
    assert err.strip().splitlines()[-1] == (f"interrupted: the finished evaluations are kept under {old / 'runs'}; "
                                            "run the same command again to resume")
    status, _, err = run_ssni(monkeypatch, capsys, "evaluate", "--config", DEMO_CONFIG, "--out", old, "--limit", "1")
    one_error(status, err, "ssni demo")


def _denied_for(monkeypatch, name: str, method: str = "mkdir",
                error: OSError = PermissionError(1, "Operation not permitted")) -> None:
    """``Path.<method>`` on a path called ``name`` fails with ``error`` (default: as in a folder the user may
    not write, the tour's immutable one)."""
    real = getattr(Path, method)

    def denied(self, *args, **kwargs):
        if self.name == name:
            raise type(error)(error.errno, error.strerror, str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, denied)


@pytest.mark.parametrize("command", [["fetch", "cifar10-data"], ["fetch", "imagenet-resnet50"],
                                     ["train", "classifier", "--steps", "1"], ["train", "score", "--steps", "1"]])
def test_fetch_and_train_refuse_a_weights_dir_they_cannot_write(monkeypatch, capsys, tmp_path, command):
    import urllib.request

    import ssni.train

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.setattr(ssni.train, "train_and_register", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "afile").write_text("x")
    status, _, err = run_ssni(monkeypatch, capsys, *command, "--weights-dir", tmp_path / "afile" / "w")
    one_error(status, err, f"cannot write into {tmp_path / 'afile' / 'w'}: Not a directory")
    _denied_for(monkeypatch, "w")
    status, _, err = run_ssni(monkeypatch, capsys, *command, "--weights-dir", tmp_path / "w")
    one_error(status, err, f"cannot write into {tmp_path / 'w'}: Operation not permitted")
    assert "--weights-dir" in err if command[0] == "train" else True
    assert _listing(tmp_path) == ["afile"]


def test_convert_says_first_that_the_file_is_missing(monkeypatch, capsys, tmp_path):
    status, _, err = run_ssni(monkeypatch, capsys, "convert", tmp_path / "none.pkl")
    one_error(status, err, f"cannot read {tmp_path / 'none.pkl'}: No such file or directory")
    assert "--allow-pickle" not in err
    status, _, err = run_ssni(monkeypatch, capsys, "convert", tmp_path)
    one_error(status, err, "it is a folder")
    (tmp_path / "real.pkl").write_bytes(b"x")
    status, _, err = run_ssni(monkeypatch, capsys, "convert", tmp_path / "real.pkl")
    one_error(status, err, "--allow-pickle")  # a file that is there: trust is asked for


@pytest.mark.parametrize("command", [["evaluate"], ["converge"], ["sweep"]])
def test_a_bad_set_value_is_refused_although_a_flag_replaces_it(monkeypatch, capsys, tmp_path, command):
    status, _, err = run_ssni(monkeypatch, capsys, *command, "--config", DEMO_CONFIG, "--out", tmp_path / "o",
                              "--limit", "1", "--set", "data.n=-5")
    one_error(status, err, "n = -5", "expected an integer >= 1")
    assert not (tmp_path / "o").exists()


def test_command_overrides_put_the_flags_over_set():
    from ssni.cli_common import command_overrides, parse_overrides

    assert command_overrides(["data.n=3", "evaluate.device=cpu"], 1, "auto", [DEMO_CONFIG]) == {
        "data.n": 1, "evaluate.device": "auto"}
    assert parse_overrides(['data.split="val"', "data.split2=val", "a.b=0.5", "a.c=true"]) == {
        "data.split": "val", "data.split2": "val", "a.b": 0.5, "a.c": True}


def test_purify_notes_the_files_it_skips(monkeypatch, capsys, tmp_path):
    from PIL import Image

    import ssni.purify_folder

    source, ran = tmp_path / "in", []
    (source / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.PNG", "c.tif", "sub/d.TIFF", "README"):
        Image.new("L", (28, 28)).save(source / name, format="PNG" if "png" in name.lower() else "TIFF")
    monkeypatch.setattr(ssni.purify_folder, "purify_folder", lambda cfg, src, out, *a: ran.append(src) or out)
    status, _, err = run_ssni(monkeypatch, capsys, "purify", source, "--out", tmp_path / "out")
    assert status == 0 and ran == [source]
    assert err.strip().splitlines() == [(f"note: 3 file(s) under {source} skipped (.tif, .tiff, no extension): "
                                         "purify reads .bmp, .jpeg, .jpg, .png, .webp")]
    for name in ("c.tif", "sub/d.TIFF", "README"):
        (source / name).unlink()
    status, _, err = run_ssni(monkeypatch, capsys, "purify", source, "--out", tmp_path / "out")
    assert status == 0 and err == ""


def test_a_shipped_model_missing_from_a_weights_dir_is_copied_not_trained(tmp_path):
    from dataclasses import replace

    from ssni.checkpoints.registry import default_weights_dir
    from ssni.evaluate import load_config
    from ssni.evaluate.build import check_models

    cfg = load_config(DEMO_CONFIG)
    with pytest.raises(CheckpointError) as err:
        check_models(cfg, tmp_path)
    shipped = default_weights_dir()
    assert str(err.value) == (
        f"{tmp_path} has no mnist-unet or mnist-cnn and no public model has that name (`ssni models` lists them); "
        f"mnist-unet and mnist-cnn ship with the package ({shipped / 'mnist-unet.safetensors'}, "
        f"{shipped / 'mnist-cnn.safetensors'}): drop --weights-dir, or copy the files and their entries in "
        f"{shipped / 'manifest.json'} into {tmp_path}")
    with pytest.raises(CheckpointError) as err:
        check_models(replace(cfg, models=replace(cfg.models, diffusion="my-unet")), tmp_path)
    assert "mnist-cnn ships with the package" in str(err.value) and "copy the file and its entry" in str(err.value)
    assert str(err.value).endswith("; train it with `ssni train score --dataset mnist-5k --name my-unet`")


def test_the_converge_ladder_default_is_the_library_one(monkeypatch, capsys, tiny_config_file, tmp_path):
    from ssni.evaluate import convergence

    seen = []

    def fake(cfg, out, attacks, rungs, *rest):
        seen.append(rungs)
        return {"choice": {}}

    monkeypatch.setattr(convergence, "run_convergence", fake)
    for extra in ([], ["--restarts", "1,3"]):
        status, _, _ = run_ssni(monkeypatch, capsys, "converge", "--config", tiny_config_file, "--out",
                                tmp_path / "c", *extra)
        assert status == 0
    assert seen == [convergence.DEFAULT_LADDER, {**convergence.DEFAULT_LADDER, "restarts": (1, 3)}]


def test_the_device_help_is_the_runtime_one():
    from ssni.cli_common import DEVICE_OPTION_HELP
    from ssni.runtime import DEVICE_HELP

    assert DEVICE_OPTION_HELP == DEVICE_HELP


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_the_no_cuda_error_is_not_worded_for_the_command_line_only():
    from ssni.errors import ConfigError
    from ssni.runtime import resolve_device

    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    assert str(err.value).endswith('; use device cpu or auto (--device cpu on the command line, '
                                   'evaluate.device = "cpu" in a config)')


@pytest.mark.parametrize("command", ["score", "classifier"])
def test_every_train_option_has_a_description(command):
    import typer

    from ssni.cli import app

    group = typer.main.get_command(app).commands["train"]
    options = [p for p in group.commands[command].params if p.name != "help"]
    assert options and [p.name for p in options if not p.help] == []


def test_demo_split_error_explains_train_only_for_train(monkeypatch, capsys, tmp_path):
    status, _, err = run_ssni(monkeypatch, capsys, "demo", "--split", "foo", "--out", tmp_path / "d")
    assert err.strip() == "error: --split 'foo': the demo evaluates test or val" and status == 2
    status, _, err = run_ssni(monkeypatch, capsys, "demo", "--split", "train", "--out", tmp_path / "d")
    one_error(status, err, "(train is the split the shipped models")
    assert not (tmp_path / "d").exists()
