import importlib.util

import pytest
import torch

from ssni import SSNI, Calibration, Defense, DiffPure, SampleNoise, VPSchedule, make_reweight, score_norm
from ssni.attacks import PGD, ThreatModel
from ssni.attacks.adaptive import AdaptiveAttack
from ssni.attacks.autoattack import AutoAttackRand
from ssni.attacks.bpda import BPDA
from ssni.attacks.checks import defense_checks
from ssni.checkpoints.registry import default_weights_dir, load_named
from ssni.data import load_split
from ssni.denoisers import UNet, UNetConfig
from ssni.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    test = load_split("mnist-5k", "test").head(32)
    return test.images, test.labels


@pytest.fixture(scope="module")
def classifier():
    return load_named("mnist-cnn", default_weights_dir())


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 4.0)])
def test_pgd_breaks_an_undefended_classifier_inside_the_ball(norm, eps, classifier, digits):
    x, y = digits
    threat = ThreatModel(norm, eps)
    x_adv = PGD(threat, steps=40, step_size=0.01 if norm == "linf" else 0.25, random_start=norm == "l2")(classifier, x, y)
    with torch.no_grad():
        assert (classifier(x).argmax(1) == y).float().mean() > 0.9
        assert (classifier(x_adv).argmax(1) == y).float().mean() <= 0.05
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_projection_onto_l2_ball_and_box():
    x = torch.full((2, 1, 4, 4), 0.5)
    far = x + torch.tensor([1.0, 0.01]).reshape(2, 1, 1, 1)
    projected = ThreatModel("l2", 1.0).project(far, x)
    norms = (projected - x).flatten(1).norm(dim=1)
    assert norms[0] <= 1.0 + 1e-6 and torch.allclose(projected[1], far[1])
    assert projected.max() <= 1


def tiny_defense(classifier, seed=0):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2))).eval()
    return Defense(classifier, DiffPure(unet, t_star=30, steps=3), seed=seed)


def test_eot_gradient_variance_shrinks_with_more_samples(classifier, digits):
    x, y = digits[0][:4], digits[1][:4]
    defense = tiny_defense(classifier)

    def spread(eot: int) -> float:
        grads = torch.stack([PGD(eot=eot).gradient(defense, x, y, None)[0] for _ in range(6)])
        return grads.var(0).sum().item()

    assert spread(8) < 0.5 * spread(1)


@pytest.mark.parametrize("attack", ["pgd", "adaptive"])
def test_stacked_eot_draws_give_the_same_attack_as_one_draw_per_pass(attack, classifier, digits):
    x, y, ids = digits[0][:3], digits[1][:3], torch.tensor([7, 3, 11])
    with torch.no_grad():
        unet = tiny_defense(classifier).purifier.model
        cal = Calibration.fit(score_norm(unet, VPSchedule(), x, SampleNoise.from_ids(5, range(3)), 2))
    results = []
    for eot_batch in (1, 4, 3):  # one draw per pass, all four stacked, 3 + 1
        defense = tiny_defense(classifier)
        if attack == "adaptive":
            defense.ssni = SSNI(defense.purifier.model, make_reweight("sigmoid", cal), n_levels=2)
        kind = AdaptiveAttack if attack == "adaptive" else PGD
        x_adv = kind(ThreatModel("linf", 0.3), steps=2, step_size=0.1, eot=4, eot_batch=eot_batch)(defense, x, y, ids)
        results.append((x_adv, defense.draw))
    # the same example from the same draws, however they are stacked (to rounding: the adaptive attack's
    # restoration step amplifies the stacked batch's last-bit differences to about 1e-6 at one thread)
    atol = 1e-5 if attack == "adaptive" else 1e-6
    for x_adv, draws in results[1:]:
        assert torch.allclose(x_adv, results[0][0], atol=atol) and draws == results[0][1]
    # PGD: 2 steps of 4 draws; the adaptive attack's own bookkeeping (its runs, the union with APGD and
    # the held-out choice) is tested in test_adaptive.py: here at least its 3 gradient estimates of 4 draws
    assert results[0][1] == 8 if attack == "pgd" else results[0][1] > 12


def test_bpda_gradient_is_the_classifier_gradient_at_the_purified_image(classifier, digits):
    x, y = digits[0][:4], digits[1][:4]
    defense = tiny_defense(classifier)
    x_var = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(BPDA(defense)(x_var), y).backward()  # uses draw 0
    purified, _ = defense.purify(x, None, draw=0)
    p_var = purified.detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(classifier(p_var), y).backward()
    assert torch.allclose(x_var.grad, p_var.grad, atol=1e-6)


# The adaptive attack's own tests (feasible set, score-norm gradient, transfer): tests/test_adaptive.py


def test_attack_loss_rises_and_defense_checks_pass(classifier, digits):
    x, y = digits[0][:8], digits[1][:8]
    defense = tiny_defense(classifier).eval()
    attack = PGD(ThreatModel("linf", 0.3), steps=3, step_size=0.1)
    attack(defense, x, y)
    assert attack.loss_trace[-1] > attack.loss_trace[0]
    checks = {c["check"]: c["passed"] for c in defense_checks(defense, x, y)}
    assert all(checks.values())


@pytest.mark.skipif(importlib.util.find_spec("pyautoattack") is None, reason="pyautoattack not installed")
def test_autoattack_attacks_every_sample_and_returns_every_apgd_run(classifier, digits):
    x, y = digits[0][:16], digits[1][:16]
    attack = AutoAttackRand(ThreatModel("linf", 0.3), steps=10, eot=1)
    x_adv = attack(classifier, x, y)
    assert len(attack.candidates) == 2 and x_adv is attack.candidates[0]  # APGD-CE, APGD-DLR
    with torch.no_grad():  # robust = correct on both runs' outputs (the runner keeps the worst)
        assert torch.stack([classifier(c).argmax(1) == y for c in attack.candidates]).all(0).float().mean() <= 0.1
        # best-loss points: even a sample misclassified from the start gets a moved example back
        moved = (attack.candidates[1] - x).flatten(1).abs().amax(1) > 0
    assert moved.all()
    for c in attack.candidates:
        assert (c - x).abs().max() <= 0.3 + 1e-5 and c.min() >= 0 and c.max() <= 1
    with pytest.raises(ConfigError, match="version"):
        AutoAttackRand(version="standard")


def test_pgd_random_start_is_keyed_by_sample_id_not_by_batch():
    x = torch.rand(6, 1, 4, 4)
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    threat = ThreatModel("linf", 0.1)
    for norm in ("linf", "l2"):
        threat = ThreatModel(norm, 0.1)
        whole = threat.random_point(x, SampleNoise.from_ids(3, ids))
        parts = torch.cat([threat.random_point(x[i:i + 2], SampleNoise.from_ids(3, ids[i:i + 2])) for i in (0, 2, 4)])
        assert torch.allclose(whole, parts, atol=1e-7) and not torch.equal(whole, x)
    starts = ThreatModel("linf", 0.1).random_point(x, SampleNoise.from_ids(3, ids)) - x
    assert starts.abs().max() <= 0.1 + 1e-6 and starts.std() > 0.03  # spread over the ball, not a corner


class _Flaky(torch.nn.Module):
    """Logits favour the label, except for sample 0 whose first call is wrong."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        logits = torch.zeros(x.shape[0], 3) + x.flatten(1)[:, :1] * 0
        logits[:, 1] = 5.0
        if self.calls == 1:
            logits[0, 1], logits[0, 2] = 0.0, 5.0
        return logits


def test_pgd_records_success_at_any_iterate():
    attack = PGD(ThreatModel("linf", 0.1), steps=3, step_size=0.05)
    attack(_Flaky(), torch.rand(2, 1, 2, 2), torch.tensor([1, 1]))
    assert attack.fooled_any_iterate.tolist() == [True, False]


def masks(n, *robust):
    """``[n]`` bool masks with the given positions robust."""
    out = []
    for ids in robust:
        m = torch.zeros(n, dtype=torch.bool)
        m[list(ids)] = True
        out.append(m)
    return out


def test_convergence_check_is_the_ladders_paired_rule():
    from ssni.attacks.checks import _budget_check

    attacked = torch.ones(16, dtype=torch.bool)
    base, fewer = masks(16, range(6), range(2))
    assert not _budget_check("steps", base, fewer, attacked)["passed"]  # the old demo's 6/16 -> 2/16
    assert "NOT CONVERGED" in _budget_check("steps", base, fewer, attacked)["detail"]
    one, none, other_one = masks(16, [3], [], [5])
    assert not _budget_check("steps", one, none, attacked)["passed"]  # 1 -> 0 of 16: beyond 5% (0.8 samples)
    check = _budget_check("steps", one, other_one, attacked)  # 1 -> 1 of 16, one lost and one gained
    assert check["passed"] and (check["lost"], check["gained"]) == (1, 1)
    seven, nine = masks(16, range(7), range(9))
    assert _budget_check("steps", base, seven, attacked)["passed"]  # one sample of slack upward
    assert "masking" in _budget_check("EOT samples", base, nine, attacked)["detail"]  # more budget helps
    wide = torch.ones(200, dtype=torch.bool)  # 60 -> 50 of 200: 25 lost, 15 gained is re-attack noise
    sixty, fifty, nested = masks(200, range(60), [*range(35), *range(60, 75)], range(50))
    assert _budget_check("steps", sixty, fifty, wide)["passed"]
    assert not _budget_check("steps", sixty, nested, wide)["passed"]  # the same counts, 10 lost, none gained


def test_convergence_check_gives_no_verdict_on_too_few_attacked_samples():
    from ssni.attacks.checks import _budget_check

    nothing = torch.zeros(16, dtype=torch.bool)
    check = _budget_check("steps", nothing, nothing, nothing)  # nothing attacked, 0 robust: not a pass
    assert not check["passed"] and "NO VERDICT" in check["detail"]
    nine = masks(16, range(9))[0]
    assert not _budget_check("steps", nothing, nothing, nine)["passed"]
    ten = masks(16, range(10))[0]
    assert _budget_check("steps", nothing, nothing, ten)["passed"]  # 0 of 10 attacked robust, 2x: still 0


class _Deterministic(torch.nn.Module):
    """A "defense" that has a purifier but no randomness (its draws do not reach it)."""

    def __init__(self, classifier):
        super().__init__()
        self.purifier, self.classifier = torch.nn.Identity(), classifier

    def forward(self, x):
        return self.classifier(self.purifier(x))


def test_stochastic_check_fails_a_deterministic_purifier_and_informs_on_a_classifier(classifier, digits):
    from ssni.attacks.checks import all_passed

    x, y = digits[0][:4], digits[1][:4]
    by_name = lambda model: {c["check"]: c for c in defense_checks(model, x, y)}  # noqa: E731
    assert by_name(tiny_defense(classifier).eval())["stochastic"]["passed"] is True
    frozen = by_name(_Deterministic(classifier).eval())["stochastic"]
    assert frozen["passed"] is False and not frozen.get("informative")
    bare = by_name(classifier)["stochastic"]
    assert bare["informative"] and bare["passed"] is None
    checks = list(by_name(classifier).values())
    assert all_passed(checks) and not all_passed(checks + [{"check": "x", "passed": False}])
    assert all_passed(checks + [{"check": "y", "passed": None, "informative": True}])


def test_sanity_checks_attack_through_the_given_gradient_target(classifier, digits):
    from ssni.attacks.checks import sanity_checks

    class Counting(BPDA):
        calls = 0

        def forward(self, *args, **kwargs):
            Counting.calls += 1
            return super().forward(*args, **kwargs)

    x, y, ids = digits[0][:4], digits[1][:4], torch.arange(4)
    defense = tiny_defense(classifier).eval()
    attack = PGD(ThreatModel("linf", 0.3), steps=1, step_size=0.1)
    names = [c["check"] for c in sanity_checks(defense, attack, x, y, ids, draws=1, target=Counting(defense))]
    assert Counting.calls == 1 + 20 + 2 + 2  # base, large eps (20 steps), 2x steps, 2x EOT: all through BPDA
    assert not any("BPDA" in name for name in names)  # BPDA against itself compares nothing
    names = [c["check"] for c in sanity_checks(defense, attack, x, y, ids, draws=1)]
    assert "full gradient at least as strong as BPDA" in names


def test_sanity_verdicts_are_the_evaluation_verdicts():
    """``fresh_verdicts`` on a batch (the sanity checks and the runner) and ``attack_verdicts`` on one
    stored row (summaries) give every protocol the same verdict."""
    from ssni.attacks.verdicts import fresh_verdicts
    from ssni.evaluate.scoring import attack_verdicts
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (40,), generator=gen)
    flip = torch.rand(5, 40, generator=gen) < 0.3
    preds = torch.where(flip, torch.randint(0, 4, (5, 40), generator=gen), y)  # mostly correct draws
    ours = fresh_verdicts(preds, y)
    assert torch.equal(ours["worst"], (preds == y).all(0)) and ours["worst"].any() and not ours["worst"].all()
    for p in ("single", "majority", "worst"):
        assert ours[p].tolist() == [attack_verdicts(preds[:, j].tolist(), int(y[j]), None)[p] for j in range(40)]
    assert ours["majority"].any() and not ours["majority"].all() and not torch.equal(ours["majority"], ours["worst"])
