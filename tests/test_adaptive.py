"""The feasible-set adaptive attack (a closed-form toy defense; tiny random networks with the MNIST classifier)
and the transfer attack."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ssni import SSNI, Calibration, Defense, DiffPure, SampleNoise, VPSchedule, make_reweight, score_norm
from ssni.attacks import APGD, ThreatModel
from ssni.attacks.adaptive import SIGMOID_ONE, AdaptiveAttack, feasible_target
from ssni.attacks.feasible_steps import l2_step, linf_step
from ssni.attacks.gradient_modes import gradient_target
from ssni.attacks.transfer import FixedLevelDefense, TransferAttack
from ssni.checkpoints.registry import default_weights_dir, load_named
from ssni.data import load_split
from ssni.denoisers import UNet, UNetConfig
from ssni.errors import ConfigError
from ssni.evaluate.build import build_attack
from ssni.evaluate.config import from_dict
from ssni.reweight import CallableReweight


@pytest.fixture(scope="module")
def digits():
    test = load_split("mnist-5k", "test").head(6)
    return test.images, test.labels, test.ids


@pytest.fixture(scope="module")
def classifier():
    return load_named("mnist-cnn", default_weights_dir())


def unet():
    return UNet(UNetConfig(base_channels=8, channel_mults=(1, 2))).eval()


def ssni_defense(classifier, x, kind="sigmoid", t_star=30, steps=3):
    """DiffPure (t* = 30, 3 steps) with SSNI on a score network of its own; calibrated on ``x``."""
    torch.manual_seed(0)
    score_unet, purify_unet = unet(), unet()
    with torch.no_grad():
        norms = score_norm(score_unet, VPSchedule(), x, SampleNoise.from_ids(5, range(len(x))), 2)
    cal = Calibration.fit(norms)
    reweight = make_reweight(kind, cal) if kind != "callable" else \
        CallableReweight(lambda e, t: torch.sigmoid((e - cal.mean) / cal.std) * (t - 1))
    ssni = SSNI(score_unet, reweight, n_levels=2)
    return Defense(classifier, DiffPure(purify_unet, t_star=t_star, steps=steps), ssni)


def fresh_norms(defense, x, ids, draws=3):
    return torch.stack([defense.explain(x, ids, 70_000 + d)["score_norm"] for d in range(draws)]).mean(0)


def attack(**kw):
    return AdaptiveAttack(ThreatModel("linf", 0.3), **{"steps": 3, "eot": 2, **kw})




class ToyDefense(nn.Module):
    """A deterministic closed-form "defense" with SSNI's interface, on 2x2 images around ``x0 = 0.5``.

    With ``d = x - x0`` (pixels ``d_0 .. d_3``): logits ``[0, w.d - theta, -1]``, so class 1 wins (the
    true class is 0) once ``w.d > theta``, ``w = (1, 1, 1, 0)``; score norm ``e = 100 (d_0 + d_1) + 10
    ||d||^2`` (scale 1). With ``e_target = 3`` a point is feasible when roughly ``d_0 + d_1 <= 0.02``, so
    the best feasible ``w.d`` is about 0.32 (``d_2 = eps = 0.3``), while the plain ascent raises
    ``d_0 + d_1`` first.
    """

    takes_sample_ids = True

    def __init__(self, theta: float, curvature: float = 10.0):
        super().__init__()
        self.theta, self.draw, self.curvature = theta, 0, curvature
        self.w, self.v = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
        calibration = SimpleNamespace(std=1.0)
        self.ssni = SimpleNamespace(reweight=SimpleNamespace(calibration=calibration, tau=1.0))

    def reserve_draws(self, count: int) -> int:
        first, self.draw = self.draw, self.draw + count
        return first

    def score_norm(self, x):
        d = x.flatten(1) - 0.5
        return 100 * d @ self.v + self.curvature * (d ** 2).sum(1)

    def forward(self, x, sample_ids=None, draw=None, return_score_norm=False):
        if draw is None:
            self.reserve_draws(1)
        d = x.flatten(1) - 0.5
        zeros = torch.zeros(len(x))
        logits = torch.stack([zeros, d @ self.w - self.theta, zeros - 1], 1)
        return (logits, self.score_norm(x)) if return_score_norm else logits


def toy_attack(**kw):
    return AdaptiveAttack(ThreatModel("linf", 0.3), **{"steps": 12, "eot": 1, "loss": "margin",
                                                       "score_target": 3.0, **kw})


TOY_X, TOY_Y = torch.full((2, 1, 2, 2), 0.5), torch.zeros(2, dtype=torch.long)


def test_toy_the_attack_finds_the_feasible_adversarial_point_that_plain_apgd_misses():
    defense = ToyDefense(theta=0.25)  # feasible fooling points exist: w.d up to ~0.32 > 0.25
    adaptive = toy_attack(unconstrained=False)
    x_adv = adaptive(defense, TOY_X, TOY_Y)
    assert (x_adv - TOY_X).abs().max() > 0.2  # not the input returned unchanged
    with torch.no_grad():
        logits, e = defense(x_adv, return_score_norm=True)
    assert (logits.argmax(1) == 1).all() and (e <= 3.0).all() and adaptive.feasible.all()
    assert torch.equal(adaptive.candidates[0], x_adv) and not adaptive.from_unconstrained.any()
    plain = APGD(ThreatModel("linf", 0.3), steps=12, loss="margin")(defense, TOY_X, TOY_Y)
    assert (defense.score_norm(plain) > 3.0).all()  # the plain ascent leaves the feasible set


def test_toy_every_trial_point_of_a_linear_constraint_stays_feasible():
    """The linear programme keeps the linearised constraint inside the boundary, so on a linear score
    norm the run never leaves the feasible set, and its radius grows to eps."""
    defense, seen = ToyDefense(theta=0.25, curvature=0.0), []
    defense.register_forward_hook(lambda m, args, out: seen.append(out[1]) if isinstance(out, tuple) else None)
    adaptive = toy_attack(unconstrained=False, restore_steps=0)
    adaptive(defense, TOY_X, TOY_Y)
    assert len(seen) == 13 + 4 * 2 and all((e <= 3.0).all() for e in seen)  # 13 estimates; 4 candidates x 2 draws
    assert (adaptive.step_trace[-1] == 0.3).all()  # no step was rejected: the radius grew to eps


def test_toy_rejected_steps_go_back_to_the_best_feasible_point():
    """A curved score norm (``60 ||d||^2``) makes large steps overshoot: they are rejected, and every step
    starts from a feasible point (the start, an accepted trial, or the best feasible iterate)."""
    defense, starts = ToyDefense(theta=0.25, curvature=60.0), []
    adaptive = toy_attack(unconstrained=False, restore_steps=0, steps=16)
    step = adaptive._step
    adaptive._step = lambda x_k, *rest: (starts.append(x_k.clone()), step(x_k, *rest))[1]
    x_adv = adaptive(defense, TOY_X, TOY_Y)
    rejected = sum(int((b < a).any()) for a, b in zip(adaptive.step_trace, adaptive.step_trace[1:]))
    assert rejected >= 1 and all((defense.score_norm(s) <= 3.0).all() for s in starts)
    assert (defense.score_norm(x_adv) <= 3.0).all() and (x_adv - TOY_X).abs().max() > 0.1


def test_toy_union_returns_the_unconstrained_example_when_no_feasible_point_fools():
    defense = ToyDefense(theta=0.5)  # feasible w.d stays under ~0.32: only infeasible points fool
    adaptive = toy_attack()
    x_adv = adaptive(defense, TOY_X, TOY_Y)
    feasible, plain = adaptive.candidates
    with torch.no_grad():
        assert (defense(feasible).argmax(1) == 0).all() and (defense.score_norm(feasible) <= 3.0).all()
        assert (defense(x_adv).argmax(1) == 1).all() and (defense.score_norm(x_adv) > 3.0).all()
    assert adaptive.from_unconstrained.all() and torch.equal(x_adv, plain)
    assert (feasible - TOY_X).abs().max() > 0.2  # the feasible run still pushed d_2 out


def test_the_shortlist_keeps_the_highest_keys_without_reading_back():
    """``_remember`` replaces, per sample, the slot of lowest key when the new key is higher (slot 0 holds
    the clean start), by selections on the device: no boolean index, so no read back to the host."""
    from ssni.runtime import count_host_reads

    adaptive = toy_attack(shortlist=2)
    x = torch.zeros(3, 1, 2, 2)
    adaptive._xs = x.unsqueeze(0).repeat(3, 1, 1, 1, 1)
    adaptive._keys = torch.full((3, 3), -torch.inf)
    reads = [count_host_reads(lambda: adaptive._remember(x, torch.zeros(3), slot=0))]
    for value, key in ((1.0, [5.0, 1.0, 2.0]), (2.0, [3.0, 4.0, 0.0]), (3.0, [4.0, 0.5, 1.0])):
        reads.append(count_host_reads(lambda: adaptive._remember(torch.full_like(x, value), torch.tensor(key))))
    assert reads == [0, 0, 0, 0]
    assert adaptive._keys.T.tolist() == [[0.0, 5.0, 4.0], [0.0, 1.0, 4.0], [0.0, 2.0, 1.0]]
    assert adaptive._xs[:, :, 0, 0, 0].T.tolist() == [[0.0, 1.0, 3.0], [0.0, 1.0, 2.0], [0.0, 1.0, 3.0]]


def test_toy_the_attack_reads_back_the_same_at_4_and_12_steps():
    """On a defense that reads nothing back itself, the feasible-set run's reads do not grow with its steps:
    the loss trace stays on the device until the end (one read), the shortlist is kept by selections."""
    from ssni.runtime import count_host_reads

    counts, traces = [], []
    for steps in (4, 12):
        adaptive = toy_attack(steps=steps, unconstrained=False)
        counts.append(count_host_reads(lambda: adaptive(ToyDefense(theta=0.25), TOY_X, TOY_Y)))
        traces.append(adaptive.loss_trace)
    assert counts[0] == counts[1]
    assert [len(t) for t in traces] == [5, 13] and all(type(v) is float for t in traces for v in t)
    assert traces[0] == traces[1][:5]  # the same run, read back once


def test_toy_restoration_brings_an_infeasible_input_inside():
    defense = ToyDefense(theta=0.25)
    x = TOY_X.clone()
    x[:, 0, 0, 0] = 0.56  # d_0 = 0.06: e = 6.0 > 3
    adaptive = toy_attack(unconstrained=False)
    x_adv = adaptive(defense, x, TOY_Y)
    assert (defense.score_norm(x_adv) <= 3.0).all() and adaptive.feasible.all()


def _lp_optimum(a, b, budget, lo, hi):
    """Brute force: every vertex of the box cut by h.d = budget (at most one coordinate strictly inside)."""
    best, n = -float("inf"), len(a)
    for ends in itertools.product((0, 1), repeat=n):
        d = torch.where(torch.tensor(ends, dtype=torch.bool), hi, lo)
        if float(b @ d) <= budget + 1e-9:
            best = max(best, float(a @ d))
        for j in range(n):  # coordinate j set so that the constraint is tight
            if b[j] != 0:
                rest = float(b @ d - b[j] * d[j])
                dj = (budget - rest) / float(b[j])
                if lo[j] <= dj <= hi[j]:
                    best = max(best, float(a @ d - a[j] * d[j]) + float(a[j]) * dj)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_linf_step_solves_the_linear_programme(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 7
    a, b = torch.randn(1, n, generator=gen), torch.randn(1, n, generator=gen)
    a[0, 0], b[0, 1] = 0.0, 0.0  # a pixel the loss ignores, one the constraint ignores
    lo, hi = -torch.rand(1, n, generator=gen) * 0.3, torch.rand(1, n, generator=gen) * 0.3
    free = float((b * torch.where(a > 0, hi, lo)).sum())
    for budget in (free + 1.0, free - 0.05, free - 0.2, -10.0):
        d = linf_step(a, b, torch.tensor([budget]), lo, hi)
        assert ((d >= lo) & (d <= hi)).all()
        least = float((b * torch.where(b > 0, lo, hi)).sum())  # the lowest h.d the box allows
        assert float(b @ d[0]) <= max(budget, least) + 1e-6
        if budget >= least:  # the programme's optimum (else the step of least h.d, checked above)
            assert float(a[0] @ d[0]) == pytest.approx(_lp_optimum(a[0], b[0], budget, lo[0], hi[0]), abs=1e-5)
    d = linf_step(a, b, torch.tensor([free + 1.0]), lo, hi)  # a loose budget: the (clipped) sign step
    assert torch.equal(d, torch.where(a > 0, hi, torch.where(a < 0, lo, torch.zeros_like(a))))


def test_l2_step_meets_the_budget_on_the_sphere():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    eta = torch.tensor([0.5, 0.5, 0.5])
    budget = torch.tensor([10.0, 0.0, -100.0])  # loose; tight; unattainable
    d = l2_step(a, b, budget, eta)
    assert torch.allclose(d.norm(dim=1), eta, atol=1e-5)
    assert torch.allclose(d[0], 0.5 * a[0] / a[0].norm(), atol=1e-6)
    assert abs(float(b[1] @ d[1])) < 1e-5 and float(a[1] @ d[1]) > 0
    assert torch.allclose(d[2], -0.5 * b[2] / b[2].norm(), atol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "linear", "callable"])
def test_feasible_candidate_keeps_the_score_norm_under_the_target(kind, classifier, digits):
    x, y, ids = digits
    defense = ssni_defense(classifier, x, kind)
    adaptive = attack(score_target="mu")
    x_adv = adaptive(defense, x, y, ids)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    feasible = adaptive.candidates[0]
    clean, adv = fresh_norms(defense, x, ids), fresh_norms(defense, feasible, ids)
    reachable = clean <= adaptive.e_target  # the clean start is feasible: the feasible candidate must be too
    assert reachable.any() and adaptive.feasible[reachable].all()
    scale = adaptive._scale
    assert (adv[reachable] <= adaptive.e_target[reachable] + 0.25 * scale[reachable]).all()
    assert adaptive.levels.shape == (1, len(x)) and (adaptive.levels >= 1).all()
    moved = (adaptive._xs[1:] - x).flatten(2).abs().amax(2)  # shortlisted feasible iterates [K, B]
    assert (moved > 0.01).any(0)[reachable].all()  # the run moved away from the clean start
    if kind == "callable":  # no calibration: each input's own clean score norm is its target
        assert torch.allclose(adaptive.e_target, clean, rtol=0.01)


def test_feasible_targets_of_each_reweighting(classifier, digits):
    x = digits[0]
    cal = ssni_defense(classifier, x).ssni.reweight.calibration
    assert feasible_target(make_reweight("sigmoid", cal, tau=3.0), "mu") == (cal.mean, 3.0)
    assert feasible_target(make_reweight("sigmoid", cal, tau=3.0), "mu+tau") == (cal.mean + 3.0, 3.0)
    middle, share = feasible_target(make_reweight("linear", cal), "mu")[0], SIGMOID_ONE
    assert middle == pytest.approx((cal.min + cal.max) / 2)
    assert feasible_target(make_reweight("linear", cal), "mu+tau")[0] == pytest.approx(
        cal.min + share * (cal.max - cal.min))
    fn = CallableReweight(lambda e, t: e)
    assert feasible_target(fn, "mu+tau") == (None, None) and feasible_target(fn, "12.5") == (12.5, None)
    with pytest.raises(ConfigError):
        feasible_target(fn, "median")
    with pytest.raises(ConfigError):
        AdaptiveAttack(score_target="median")


def test_restoration_pulls_the_score_norm_down(classifier, digits):
    x, y, ids = digits
    defense = ssni_defense(classifier, x)
    clean = fresh_norms(defense, x, ids)
    adaptive = attack(score_target=float(clean.min()) - 50.0, steps=4, unconstrained=False)  # infeasible for all
    x_adv = adaptive(defense, x, y, ids)
    assert (fresh_norms(defense, x_adv, ids) < clean - 5.0).all()


def test_draws_and_score_norm_passes(classifier, digits):
    """Each estimate is one forward pass (its score norm reused), each restoration step one score-norm pass;
    the choice uses held-out draws the gradient never saw."""
    x, y, ids = digits
    defense = ssni_defense(classifier, x)
    calls = {"score": 0, "defense": 0}
    defense.ssni.score_model.register_forward_hook(lambda *a: calls.__setitem__("score", calls["score"] + 1))
    defense.register_forward_hook(lambda *a: calls.__setitem__("defense", calls["defense"] + 1))
    adaptive = attack(steps=2, eot=2, shortlist=2, heldout_draws=3, restore_steps=1)
    adaptive(defense, x, y, ids)
    run, restore, plain = (2 + 1) * 2, 2 * 1 * 2, (2 + 1) * 2  # estimates; restoration; plain APGD
    heldout = (2 + 1 + 1) * 3  # 2 shortlisted iterates, the clean start and the APGD output, 3 draws each
    assert calls["defense"] == run + plain + heldout
    assert calls["score"] == calls["defense"] + restore
    assert defense.draw == run + restore + plain + 3  # the candidates share 3 held-out draws


def test_surrogate_gradient_chooses_the_output_on_the_scored_defense(classifier, digits):
    """With gradient = "surrogate" the held-out choice among candidates runs the full defense, not the
    1-step chain the gradient followed (same held-out draws, from the shared counter); the constraint's
    gradient comes from a differentiable score-norm pass, since the surrogate's levels are constants."""
    x, y, ids = digits
    defense = ssni_defense(classifier, x, t_star=200, steps=6).eval()
    surrogate = gradient_target(defense, "surrogate", 1)
    assert surrogate.scored is defense
    adaptive = attack(unconstrained=False)
    x_adv = adaptive(surrogate, x, y, ids)
    heldout = defense.draw - adaptive.heldout_draws  # the held-out draws are the attack's last
    chosen = {}
    for name, model in (("defense", defense), ("surrogate", surrogate)):
        defense.draw = heldout
        chosen[name] = adaptive._select(model, y, ids)
    assert not torch.equal(chosen["defense"], chosen["surrogate"])  # the two chains disagree on some sample
    assert torch.equal(x_adv, chosen["defense"])


def test_stacked_draws_give_the_same_estimates(classifier, digits):
    x, y, ids = digits
    defense = ssni_defense(classifier, x)
    points = []
    for eot_batch in (1, 3):
        adaptive = attack(eot=3, eot_batch=eot_batch)
        adaptive._set_target(defense, x, ids)
        adaptive._target, adaptive.loss_trace = None, []
        adaptive.fooled_any_iterate = torch.zeros(len(x), dtype=torch.bool)
        defense.draw = 500
        points.append(adaptive._estimate(defense, x, y, ids))
    for name in ("grad", "grad_c", "loss", "c"):
        assert torch.allclose(getattr(points[0], name), getattr(points[1], name), rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("mode", ["exact", "surrogate"])
def test_both_gradients_reach_the_input(mode, classifier, digits):
    x, y, ids = digits
    defense = ssni_defense(classifier, x)
    adaptive = attack()
    adaptive._set_target(defense, x, ids)
    adaptive._target, adaptive.loss_trace = None, []
    adaptive.fooled_any_iterate = torch.zeros(len(x), dtype=torch.bool)
    p = adaptive._estimate(gradient_target(defense, mode, 1), x, y, ids)
    assert p.grad.abs().sum() > 0 and p.grad_c.abs().sum() > 0 and not torch.equal(p.grad, p.grad_c)
    h, c = adaptive._constraint(defense, x, ids)  # score-norm passes alone: same kind of estimate
    assert torch.nn.functional.cosine_similarity(h.flatten(1), p.grad_c.flatten(1)).min() > 0.5
    with pytest.raises(ConfigError):
        attack()(Defense(classifier, defense.purifier), x, y, ids)


def test_transfer_attack_crafts_at_the_clean_levels(classifier, digits, monkeypatch):
    x, y, ids = digits
    defense = ssni_defense(classifier, x)
    seen, purify = [], defense.purifier.purify

    def recording(x, t, *args, **kw):
        seen.append(t.clone())
        return purify(x, t, *args, **kw)

    monkeypatch.setattr(defense.purifier, "purify", recording)
    calls = []
    defense.ssni.score_model.register_forward_hook(lambda *a: calls.append(1))
    transfer = TransferAttack(APGD(ThreatModel("linf", 0.3), steps=2, eot=1), level_draws=2)
    x_adv = transfer(defense, x, y, ids)
    assert x_adv.shape == x.shape and transfer.fooled_any_iterate is None
    assert len(calls) == 2 * 2  # score norms of the clean inputs, then of the outputs: none while crafting
    assert seen and all(torch.equal(t, transfer.clean_levels) for t in seen)
    clean_levels = torch.stack([defense.explain(x, ids, d)["t_star"] for d in range(4)]).float().mean(0)
    assert (transfer.clean_levels - clean_levels).abs().max() <= 3 and transfer.levels.shape == (1, len(x))
    fixed = FixedLevelDefense(defense, {int(i): transfer.clean_levels[:, j] for j, i in enumerate(ids)})
    with pytest.raises(ConfigError):
        fixed(x, sample_ids=ids + 1000)


def test_adaptive_and_transfer_are_registered(classifier, digits):
    defense = ssni_defense(classifier, digits[0])
    cfg = from_dict({"attacks": [{"name": "adaptive", "score_target": "mu", "loss": "margin"},
                                 {"name": "transfer", "restarts": 2}]})
    adaptive, target = build_attack(cfg.attacks[0], defense, seed=3)
    assert isinstance(adaptive, AdaptiveAttack) and target is defense
    assert (adaptive.score_target, adaptive.loss, adaptive.seed, adaptive.unconstrained) == ("mu", "margin", 3, True)
    transfer, target = build_attack(cfg.attacks[1], defense, seed=3)
    assert isinstance(transfer, TransferAttack) and isinstance(transfer.attack, APGD)
    assert transfer.attack.restarts == 2
    for bad in ({"name": "transfer", "gradient": "surrogate"}, {"name": "adaptive", "score_target": "x"}):
        with pytest.raises(ConfigError):
            build_attack(from_dict({"attacks": [bad]}).attacks[0], defense, 0)
