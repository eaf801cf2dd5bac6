import json

import pytest
import torch

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


def test_rule_rejects_the_issue_sequences_that_the_unpaired_half_width_accepted():
    # issue 21: 50% -> 37.5% of 32 passed as noise, and at n = 200 a rung 6 points above the largest
    small = conv.first_stable([10, 20, 50, 100, 200], [16, 14, 13, 12, 12], 32)
    assert small["chosen"] == 50  # 10 and 20 stay 4 and 2 samples above the largest (tolerance 1.6)
    assert small["largest"] == {"rung": 200, "correct": 12, "n": 32} and small["correct"] == 13
    large = conv.first_stable([10, 20, 50, 100, 200], [80, 72, 66, 62, 60], 200)
    assert large["chosen"] == 100  # 20: 12 above (tolerance 10); 50: 66 -> 60 has p = 1/64 from the counts
    assert "a larger rung breaks more" in large["reasoning"][1] and "converged" in large["reasoning"][3]


def test_rule_is_paired_on_per_sample_verdicts():
    # 60 -> 50 of 200: from the counts alone (at least 10 lost, none gained) p = 2^-10: not converged;
    # paired, 25 lost and 15 gained is p = 0.08: re-attack noise, converged (10 = the tolerance)
    assert conv.first_stable([10, 20], [60, 50], 200)["chosen"] is None
    base, other = list(range(60)), list(range(35)) + list(range(60, 75))
    paired = conv.first_stable([10, 20], [60, 50], 200, robust_ids=[base, other])
    assert paired["chosen"] == 10 and "lost 25, gained 15" in paired["reasoning"][0]
    # the same two counts with every sample of the larger rung's drop lost: significant
    nested = conv.first_stable([10, 20], [60, 50], 200, robust_ids=[base, list(range(50))])
    assert nested["chosen"] is None and "lost 10, gained 0" in nested["reasoning"][0]


def test_rule_gives_no_verdict_without_enough_attacked_samples():
    assert conv.first_stable([10, 20, 40], [0, 0, 0], 32, attacked=0)["chosen"] is None  # nothing attacked
    few = conv.first_stable([10, 20, 40], [2, 2, 2], 32, attacked=conv.MIN_ATTACKED - 1)
    assert few["chosen"] is None and "no verdict" in few["reasoning"][0]
    # 0 robust of 32 attacked: no larger budget can break more, so the first rung is converged
    assert conv.first_stable([10, 20, 40], [0, 0, 0], 32, attacked=32)["chosen"] == 10


def test_rule_compares_against_the_largest_rung_not_only_the_next():
    # 10 -> 20 loses 1 sample, but 40 is 6 lower: a slow slide is not convergence
    out = conv.first_stable([10, 20, 40, 80], [16, 15, 10, 9], 40)
    assert out["chosen"] == 40
    assert "a larger rung breaks more" in out["reasoning"][0]


def test_choice_takes_the_largest_rung_any_protocol_needs_and_reports_the_largest_rung():
    from ssni.evaluate.summary import accuracy

    points = [{**point("steps", s, w), "majority": accuracy(m, 40)}
              for s, w, m in ((10, 2, 20), (20, 1, 6), (40, 0, 5))]
    choice = conv.choose_budget(points)["pgd"]
    assert conv.choose_budget(points, protocols=("worst",))["pgd"]["budget"] == {"steps": 10}
    assert choice["budget"] == {"steps": 20}  # the majority still falls 20 -> 6 of 40 after 10 steps
    axis = choice["axes"]["steps"]
    assert axis["at_chosen"] == {"worst": 1, "majority": 6} and axis["at_largest"] == {"worst": 0, "majority": 5}
    assert choice["verdict"] == "steps 20 (worst 1/40, majority 6/40; largest rung 40: worst 0/40, majority 5/40)"
    assert any(line.startswith("majority at 10") for line in axis["reasoning"]) and not axis["paired"]


def test_choice_says_not_converged_when_every_rung_still_drops():
    steps = [point("steps", 5, 30), point("steps", 10, 18), point("steps", 20, 6)]
    eot = [point("eot", 1, 12), point("eot", 2, 11)]
    choice = conv.choose_budget(steps + eot, protocols=("worst",))["pgd"]
    assert choice["axes"]["steps"]["chosen"] is None and choice["budget"] is None
    assert choice["axes"]["eot"]["chosen"] == 1  # 12 -> 11 of 40: p 0.5, within 2 samples
    assert not choice["converged"] and choice["verdict"] == "not converged within the ladder (steps)"


def test_choice_reads_stored_per_sample_verdicts_and_attacked_counts():
    line = [{**point("steps", s, len(ids)), "robust_ids": {"worst": ids}, "attacked": 40}
            for s, ids in ((10, list(range(12))), (20, list(range(4, 16))))]  # 12 -> 12: lost 4, gained 4
    axis = conv.choose_budget(line, protocols=("worst",))["pgd"]["axes"]["steps"]
    assert axis["chosen"] == 10 and axis["paired"] and "lost 4, gained 4" in axis["reasoning"][0]
    few = [{**p, "attacked": 3} for p in line]
    assert conv.choose_budget(few, protocols=("worst",))["pgd"]["budget"] is None


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
        assert p["attacked"] == p["clean"]["correct"]  # per-sample verdicts for the paired rule
        for protocol in ("worst", "majority", "single", "any_iterate"):
            assert len(p["robust_ids"][protocol]) == p[protocol]["correct"]
        assert set(p["robust_ids"]["worst"]) <= set(p["robust_ids"]["single"])
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


class NoisyLinear(torch.nn.Module):
    """A classifier whose logits get a noise fixed by (sample id, draw), and a draw counter like a Defense."""

    takes_sample_ids = True

    def __init__(self):
        super().__init__()
        self.linear, self.draw = torch.nn.Linear(4, 3), 0
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

    def reserve_draws(self, count: int) -> int:
        first, self.draw = self.draw, self.draw + count
        return first

    def forward(self, x, sample_ids=None, draw=None):
        draw = torch.as_tensor(self.reserve_draws(1) if draw is None else draw)
        key = (draw * 7919 + sample_ids * 104729)[:, None] + torch.arange(3)
        noise = torch.frac(torch.sin(key.double() * 1.618) * 43758.5453).float() - 0.5
        return self.linear(x.flatten(1)) + noise


def test_sanity_budget_runs_are_paired_on_the_same_draws():
    """--sanity's 2x-budget checks compare two runs sample by sample: both must start from the same attack
    draws and be scored on the same fresh draws. Scored on the model's running counter, the same attack
    run twice lost and gained samples from the draws alone."""
    from ssni.attacks import PGD, ThreatModel
    from ssni.attacks.checks import _budget_check, _robust

    model, x = NoisyLinear(), torch.rand(40, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y, ids = model.linear(x.flatten(1)).argmax(1), torch.arange(40)
    attack = PGD(ThreatModel("linf", 0.01), steps=1, step_size=0.01, eot=2)
    runs = [_robust(model, model, attack, x, y, ids, draws=3) for _ in range(2)]
    assert 0 < int(runs[0].sum()) < 40 and torch.equal(runs[0], runs[1])
    check = _budget_check("steps", runs[0], runs[1], torch.ones(40, dtype=torch.bool))
    assert check["lost"] == check["gained"] == 0
