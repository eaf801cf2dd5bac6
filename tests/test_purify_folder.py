"""`ssni purify`: a folder of real MNIST digits through the shipped demo defense, resumably."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ssni.cli import app
from ssni.data import load_split
from ssni.errors import InputError, ResumeError, SSNIWarning
from ssni.purify_folder import read_images

QUICK = ["--set", "purifier.steps=3", "--set", "purifier.t_star=60", "--no-progress"]


@pytest.fixture
def digits(tmp_path) -> Path:
    data = load_split("mnist-5k", "test").head(7)
    for i, (x, y) in enumerate(zip(data.images, data.labels)):
        (tmp_path / "in" / str(int(y))).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / "in" / str(int(y)) / f"{i}.png")
    return tmp_path / "in"


def _run(source: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["purify", str(source), "--out", str(out), *QUICK, *extra])


def _table(out: Path) -> dict[str, dict]:
    with open(out / "purify.csv", newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_purify_writes_every_image_with_its_level_and_prediction(digits, tmp_path):
    result = _run(digits, tmp_path / "out", "--width", "3", "--chunk", "4")
    assert result.exit_code == 0, result.output
    table = _table(tmp_path / "out")
    assert len(table) == 7
    for file, row in table.items():
        assert _pixels(tmp_path / "out" / file).shape == (28, 28)
        assert 1 <= int(row["t_star"]) <= 60 and float(row["score_norm"]) > 0
    correct = sum(int(r["prediction"]) == int(f.split("/")[0]) for f, r in table.items())
    assert correct >= 6  # the demo defense keeps clean digits


def test_results_do_not_depend_on_width_interruption_or_other_files(digits, tmp_path):
    assert _run(digits, tmp_path / "a", "--width", "7", "--chunk", "7").exit_code == 0
    # Interrupted: a first run over part of the folder, then more files appear and the run resumes.
    moved = sorted(digits.rglob("*.png"))[:3]
    hidden = tmp_path / "hidden"
    for file in moved:
        (hidden / file.parent.name).mkdir(parents=True, exist_ok=True)
        file.rename(hidden / file.parent.name / file.name)
    assert _run(digits, tmp_path / "b", "--width", "2", "--chunk", "2").exit_code == 0
    first = _table(tmp_path / "b")
    for file in moved:
        (hidden / file.parent.name / file.name).rename(file)
    assert _run(digits, tmp_path / "b", "--width", "2", "--chunk", "2").exit_code == 0
    a, b = _table(tmp_path / "a"), _table(tmp_path / "b")
    assert len(b) == 7 and all(b[f] == first[f] for f in first)  # nothing redone
    for file in a:
        assert a[file]["t_star"] == b[file]["t_star"] and a[file]["prediction"] == b[file]["prediction"]
        diff = np.abs(_pixels(tmp_path / "a" / file).astype(int) - _pixels(tmp_path / "b" / file).astype(int))
        assert diff.max() <= 1  # same randomness per file; at most a rounding step apart


def test_a_bad_image_is_named_and_earlier_work_is_kept(digits, tmp_path):
    (digits / "9").mkdir(exist_ok=True)
    (digits / "9" / "zz-broken.png").write_bytes(b"not a png")
    result = _run(digits, tmp_path / "out", "--chunk", "4")
    assert isinstance(result.exception, InputError) and "zz-broken.png" in str(result.exception)
    assert len(_table(tmp_path / "out")) == 4  # the first chunk was written before the bad file's chunk


def test_resuming_with_another_config_is_refused(digits, tmp_path):
    assert _run(digits, tmp_path / "out", "--chunk", "4").exit_code == 0
    result = CliRunner().invoke(app, ["purify", str(digits), "--out", str(tmp_path / "out"), *QUICK,
                                      "--set", "purifier.t_star=70"])
    assert isinstance(result.exception, ResumeError) and "another config" in str(result.exception)


def test_the_output_folder_may_not_lie_inside_the_input(digits):
    result = _run(digits, digits / "out")
    assert isinstance(result.exception, InputError) and "must not contain each other" in str(result.exception)


def test_a_run_killed_mid_row_resumes_and_redoes_only_the_unfinished_file(digits, tmp_path):
    assert _run(digits, tmp_path / "out").exit_code == 0
    table = tmp_path / "out" / "purify.csv"
    full = table.read_text()
    table.write_text(full[: full.rindex("\n", 0, len(full) - 1) + 5])  # last row cut after 4 characters
    assert len(_table(tmp_path / "out")) == 7  # csv reads the cut row as a (wrong) row
    assert _run(digits, tmp_path / "out").exit_code == 0
    assert table.read_text() == full
    table.write_text("")  # killed before the header was flushed
    assert _run(digits, tmp_path / "out").exit_code == 0
    assert table.read_text().splitlines()[0] == "file,score_norm,t_star,prediction" and len(_table(tmp_path / "out")) == 7


def test_two_inputs_that_would_share_an_output_name_are_refused(digits):
    Image.new("L", (28, 28)).save(digits / "0" / "4.jpg")  # 0/4.png exists
    result = _run(digits, digits.parent / "out")
    assert isinstance(result.exception, InputError) and "would both be written" in str(result.exception)


@pytest.mark.parametrize("size,message", [((40, 28), "40x28"), ((1, 1), "less than half")])
def test_non_square_or_tiny_images_are_refused_not_cropped_or_stretched(digits, tmp_path, size, message):
    Image.new("L", size).save(digits / "0" / "odd.png")
    result = _run(digits, tmp_path / "out")
    assert isinstance(result.exception, InputError) and "odd.png" in str(result.exception)
    assert message in str(result.exception)


def test_a_larger_square_image_is_resized(digits, tmp_path):
    for f in list(digits.rglob("*.png"))[1:]:
        f.unlink()
    (only,) = digits.rglob("*.png")
    Image.open(only).resize((56, 56)).save(only)
    result = _run(digits, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert _pixels(tmp_path / "out" / only.relative_to(digits)).shape == (28, 28)


def test_a_purified_image_deleted_after_the_run_is_purified_again(digits, tmp_path):
    assert _run(digits, tmp_path / "out").exit_code == 0
    victim = sorted((tmp_path / "out").rglob("*.png"))[2]
    before, table = victim.read_bytes(), (tmp_path / "out" / "purify.csv").read_text()
    victim.unlink()
    with pytest.warns(SSNIWarning, match="missing"):
        result = _run(digits, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == before  # the same randomness per file: the same image again
    rows = (tmp_path / "out" / "purify.csv").read_text().splitlines()
    assert len(rows) == 8 and sorted(rows) == sorted(table.splitlines())  # listed once, same values


def test_16_bit_images_are_scaled_not_clipped(digits, tmp_path):
    first = sorted(digits.rglob("*.png"))[0]
    eight = _pixels(first)
    (tmp_path / "16").mkdir()
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16" / "a.png")  # 255 -> 65535
    with Image.open(tmp_path / "16" / "a.png") as img:
        assert img.mode == "I;16"
    x16 = read_images(tmp_path / "16", [Path("a.png")], "mnist-5k")
    x8 = read_images(first.parent, [Path(first.name)], "mnist-5k")
    assert torch.equal(x16, x8)


def test_a_decompression_bomb_is_one_error(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 28x28 = 784 > 2x the limit: PIL refuses to decode
    first = sorted(digits.rglob("*.png"))[0]
    with pytest.raises(InputError, match="too large to decode safely"):
        read_images(first.parent, [Path(first.name)], "mnist-5k")


def test_a_much_larger_image_is_shrunk_with_a_warning_that_gives_the_factor(digits, tmp_path):
    first = sorted(digits.rglob("*.png"))[0]
    Image.open(first).resize((280, 280)).save(tmp_path / "big.png")
    Image.open(first).resize((56, 56)).save(tmp_path / "twice.png")
    with pytest.warns(SSNIWarning, match=r"1 image\(s\) shrunk.*big.png \(280x280, by 10x\)"):
        x = read_images(tmp_path, [Path("big.png"), Path("twice.png")], "mnist-5k")
    assert x.shape == (2, 1, 28, 28)
