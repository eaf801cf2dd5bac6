"""Scoring of stochastic defenses: several candidates per attack (no choice on the scoring draws) and
the robust-vs-draws curve of a cascade (issue 21, items 3 and 4)."""

import torch

from ssni.evaluate import runner
from ssni.evaluate.scoring import attack_verdicts, candidate_fields, robust_under, stored_candidate, union_verdicts
from ssni.evaluate.summary import robust_vs_draws


def two_equal_candidates(monkeypatch, samples=4000, draws=8, p=0.6):
    """Two candidates per sample, each classified correctly (label 1) on each fresh draw with
    probability ``p``, independently: the predictions the runner's ``predict`` returns."""
    gen = torch.Generator().manual_seed(0)
    correct = torch.rand(2, draws, samples, generator=gen) < p  # [K, N, B]
    table = torch.where(correct, 1, 0)
    monkeypatch.setattr(runner, "predict", lambda m, x, ids, draw: table[int(x[0, 0, 0, 0]), draw - runner.RESCORE_DRAW])
    candidates = [torch.full((samples, 1, 1, 1), float(k)) for k in range(2)]
    return candidates, torch.ones(samples, dtype=torch.long), correct


def test_candidates_are_scored_each_on_its_own_and_the_union_taken(monkeypatch):
    """Issue 21's simulation: picking the candidate with the fewest correct draws and reading ``single``
    from the same draws gives about 0.50, where one candidate gives 0.60 and the union of both 0.36."""
    candidates, y, correct = two_equal_candidates(monkeypatch)
    x_adv, preds = runner.worst_candidate(None, candidates, y, torch.arange(len(y)), 8)
    assert preds.shape == (2, 8, len(y))
    verdicts = union_verdicts(preds, y)
    single = verdicts["single"].float().mean().item()
    assert abs(single - 0.36) < 0.03  # the union's truth, 0.6 ** 2 (sd 0.008)
    assert torch.equal(verdicts["single"], correct[:, 0].all(0))
    # what the old choice read off the draws it chose on: biased, about 0.50
    pick = stored_candidate(preds, y)
    chosen_first = correct[pick, 0, torch.arange(len(y))].float().mean().item()
    assert abs(chosen_first - 0.50) < 0.03 and abs(single - chosen_first) > 0.1
    # worst of N is what the fewest-correct choice gave: robust only if both candidates survive all draws
    assert torch.equal(verdicts["worst"], correct.all(1).all(0))
    assert torch.equal(verdicts["worst"], correct[pick, :, torch.arange(len(y))].all(1))
    # majority: robust against both candidates' majority votes (each unbiased on the fresh draws)
    majority_each = correct.sum(1) > 4  # label votes beat the one wrong class
    assert torch.equal(verdicts["majority"], majority_each.all(0))
    # the stored example is the fewest-correct one, and the stored row gives the same verdicts
    assert torch.equal(x_adv[:, 0, 0, 0].long(), pick)
    for j in range(50):
        fields = candidate_fields(preds, pick, j)
        assert len(fields["candidate_preds"]) == 2 and fields["preds"] == fields["candidate_preds"][int(pick[j])]
        row = attack_verdicts(fields["preds"], 1, None, candidate_preds=fields["candidate_preds"])
        assert all(row[p] == bool(verdicts[p][j]) for p in ("single", "majority", "worst"))
        assert row["any_iterate"] == row["worst"]


def test_one_candidate_is_stored_and_scored_as_before():
    preds = torch.tensor([[[1, 0], [1, 1], [0, 1]]])  # [K=1, N=3, B=2]
    y = torch.tensor([1, 1])
    fields = candidate_fields(preds, stored_candidate(preds, y), 1)
    assert fields == {"preds": [0, 1, 1]}  # no candidate_preds for a single output
    assert union_verdicts(preds, y)["single"].tolist() == [True, False]
    assert union_verdicts(preds[0], y)["majority"].tolist() == [True, True]


def row(label, clean_correct, *attacks):
    return {"label": label, "clean_correct": clean_correct,
            "attacks": {f"{k}:a{k}": a for k, a in enumerate(attacks) if a is not None}}


def test_majority_curve_counts_a_sample_a_later_attack_skipped_as_broken():
    """Sample 0: the first attack leaves draws (wrong, right, right, wrong): single and majority of 4
    broken, so the second attack skipped it; its majority of 3 draws reads robust, but the second attack
    would have run on it had the cascade been judged on 3 draws. Sample 1: attacked twice, robust."""
    keys = ["0:a0", "1:a1"]
    rows = [row(1, 1, {"preds": [0, 1, 1, 0], "fooled_during": False}, None),
            row(1, 1, {"preds": [1, 1, 1, 1], "fooled_during": False}, {"preds": [1, 0, 1, 1], "fooled_during": False}),
            row(1, 0, None, None)]  # clean-wrong: never attacked
    assert attack_verdicts([0, 1, 1, 0], 1, False, n=3)["majority"]  # the first attack alone, 3 draws
    curve = robust_vs_draws(rows, keys, 4)
    assert curve["majority"] == [1 / 3, 0.0, 1 / 3, 1 / 3]  # k = 2: sample 1's 1-1 tie counts as broken
    assert curve["worst"] == [1 / 3, 0.0, 0.0, 0.0]
    assert robust_under(rows, keys, "majority", 3) == [False, True, False]
    assert robust_under(rows, keys[:1], "majority", 3) == [True, True, False]  # before the skipping attack
    assert robust_under(rows, keys, "majority") == [False, True, False]  # at N nothing changes


def test_report_renders_informative_checks_apart_and_flags_failures():
    from ssni.evaluate.summary import format_check

    assert format_check({"check": "a", "passed": True, "detail": "d"}) == "[ok    ] a: d"
    assert format_check({"check": "a", "passed": False, "detail": "d"}) == "[FAILED] a: d"
    assert format_check({"check": "a", "passed": None, "informative": True, "detail": "d"}) == "[info  ] a: d"
