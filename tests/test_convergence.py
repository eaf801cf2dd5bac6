import json

import pytest

from ssni.errors import ConfigError
from ssni.evaluate import load_config
from ssni.evaluate import convergence as conv

OVERRIDES = {"data.n": 4, "evaluate.batch_size": 4, "attacks.0.step_size": 0.1}


@pytest.fixture
def cfg(tiny_config_file):
    return load_config(tiny_config_file, OVERRIDES)


def point(axis, value, correct, n=40):
    from ssni.evaluate.summary import accuracy

    return {"attack": "pgd", "axis": axis, "steps": 10, "eot": 2, "restarts": 1, axis: value,
            "worst": accuracy(correct, n)}


def test_rule_picks_first_rung_that_every_larger_rung_agrees_with():
    # 40 images: 8/40 has a 95% Wilson half-width of about 5.3 samples, 12/40 about 5.9
    steps = [point("steps", 5, 20), point("steps", 10, 8), point("steps", 20, 6), point("steps", 40, 6)]
    eot = [point("eot", 1, 12), point("eot", 2, 10), point("eot", 4, 9)]
    choice = conv.choose_budget(steps + eot, protocols=("worst",))["pgd"]
    assert choice["axes"]["steps"]["chosen"] == 10  # 5 -> 10 moves 12 samples, 10 -> 20 and 40 move 2
    assert choice["axes"]["eot"]["chosen"] == 1  # 1 -> 2 and 1 -> 4 move 2 and 3 < 5.9
    assert choice["budget"] == {"steps": 10, "eot": 1} and choice["converged"]


def test_rule_says_not_converged_when_every_step_still_moves():
    steps = [point("steps", 5, 30), point("steps", 10, 18), point("steps", 20, 6)]
    eot = [point("eot", 1, 12), point("eot", 2, 11)]
    choice = conv.choose_budget(steps + eot, protocols=("worst",))["pgd"]
    assert choice["axes"]["steps"]["chosen"] is None and choice["budget"] is None
    assert not choice["converged"] and choice["verdict"] == "not converged within the ladder (steps)"


def test_rule_compares_against_the_largest_rung_not_only_the_next():
    # 10 -> 20 moves 1 sample, but 40 moves 6: a slow slide is not convergence (16/40: half-width ~5.8)
    out = conv.first_stable([10, 20, 40, 80], [16, 15, 10, 9], 40)
    assert out["chosen"] == 40
    assert "a larger rung moves beyond" in out["reasoning"][0]


def test_rule_takes_the_largest_rung_any_protocol_needs():
    from ssni.evaluate.summary import accuracy

    points = [{**point("steps", s, w), "majority": accuracy(m, 40)}
              for s, w, m in ((10, 2, 20), (20, 1, 6), (40, 0, 4))]
    choice = conv.choose_budget(points)["pgd"]
    assert conv.choose_budget(points, protocols=("worst",))["pgd"]["budget"] == {"steps": 10}
    assert choice["budget"] == {"steps": 20}  # the majority still falls 20 -> 6 of 40 after 10 steps
    assert any(line.startswith("majority at 10") for line in choice["axes"]["steps"]["reasoning"])


def test_parse_ladder_and_points(cfg):
    ladder = conv.parse_ladder("steps=4,1,2; eot=1,2 restarts=1,2")
    assert ladder == {"steps": (1, 2, 4), "eot": (1, 2), "restarts": (1, 2)}
    pgd = conv.budget_points(cfg, "pgd", ladder)
    assert [(p["axis"], p["steps"], p["eot"]) for p in pgd] == [
        ("steps", 1, 1), ("steps", 2, 1), ("steps", 4, 1), ("eot", 1, 1), ("eot", 1, 2)]  # pgd: no restarts
    assert len(conv.budget_points(cfg, "apgd", ladder)) == 7
    for bad in ("steps", "iters=1,2", "steps=a", "steps=0,1"):
        with pytest.raises(ConfigError):
            conv.parse_ladder(bad)


def test_study_writes_files_and_resumes(cfg, tiny_weights, tmp_path, monkeypatch):
    out = tmp_path / "conv"
    ladder = {"steps": (1, 2), "eot": (1, 2)}
    first = conv.run_convergence(cfg, out, None, ladder, tiny_weights, progress=False)
    assert (out / "convergence.png").stat().st_size > 0
    saved = json.loads((out / "convergence.json").read_text())
    assert saved["split"] == "val" and len(saved["points"]) == 4  # base point listed on both axes
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "pgd-steps1-eot1-restarts1", "pgd-steps1-eot2-restarts1", "pgd-steps2-eot1-restarts1"]
    for p in saved["points"]:
        assert p["worst"]["n"] == 4 and p["worst"]["correct"] <= p["majority"]["correct"] + 4
        assert p["worst"]["ci95"][0] <= p["worst"]["acc"] <= p["worst"]["ci95"][1]
    assert set(saved["choice"]["pgd"]["axes"]) == {"steps", "eot"}
    from ssni.evaluate import runner

    def no_batch(*args, **kwargs):
        raise AssertionError("a resumed study ran a batch again")

    monkeypatch.setattr(runner, "run_batch", no_batch)  # a rerun finds every sample of every point stored
    again = conv.run_convergence(cfg, out, None, ladder, tiny_weights, progress=False)
    assert [p["worst"] for p in again["points"]] == [p["worst"] for p in first["points"]]
    assert [p["seconds"] for p in again["points"]] == [p["seconds"] for p in first["points"]]

def test_cli_converge(tiny_config_file, tiny_weights, tmp_path):
    from typer.testing import CliRunner

    from ssni.cli import app

    sets = [arg for key, value in OVERRIDES.items() for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["converge", "--config", str(tiny_config_file), "--out", str(tmp_path / "c"),
                                      "--ladder", "steps=1,2", "--limit", "2", *sets,
                                      "--weights-dir", str(tiny_weights), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "pgd:" in result.output and (tmp_path / "c" / "convergence.json").is_file()
