"""The feasible-set adaptive attack and the transfer attack (tiny random networks, the MNIST classifier)."""

import pytest
import torch

from ssni import SSNI, Calibration, Defense, DiffPure, SampleNoise, VPSchedule, make_reweight, score_norm
from ssni.attacks import APGD, ThreatModel
from ssni.attacks.adaptive import SIGMOID_ONE, AdaptiveAttack, feasible_target
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


@pytest.mark.parametrize("kind", ["sigmoid", "linear", "callable"])
def test_returned_examples_keep_the_score_norm_under_the_target(kind, classifier, digits):
    x, y, ids = digits
    defense = ssni_defense(classifier, x, kind)
    adaptive = attack(score_target="mu")
    x_adv = adaptive(defense, x, y, ids)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    clean, adv = fresh_norms(defense, x, ids), fresh_norms(defense, x_adv, ids)
    reachable = clean <= adaptive.e_target  # the clean start is feasible: the output must be too
    assert reachable.any() and adaptive.feasible[reachable].all()
    scale = adaptive._scale
    assert (adv[reachable] <= adaptive.e_target[reachable] + 0.25 * scale[reachable]).all()
    assert adaptive.levels.shape == (1, len(x)) and (adaptive.levels >= 1).all()
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


def test_the_penalty_pulls_the_score_norm_down(classifier, digits):
    x, y, ids = digits
    defense = ssni_defense(classifier, x)
    clean = fresh_norms(defense, x, ids)
    adaptive = attack(score_target=float(clean.min()) - 50.0, steps=4)  # infeasible for every input
    x_adv = adaptive(defense, x, y, ids)
    assert (fresh_norms(defense, x_adv, ids) < clean - 5.0).all()


def test_one_score_norm_pass_per_forward_and_held_out_draws(classifier, digits):
    x, y, ids = digits
    defense = ssni_defense(classifier, x)
    calls = {"score": 0, "defense": 0}
    defense.ssni.score_model.register_forward_hook(lambda *a: calls.__setitem__("score", calls["score"] + 1))
    defense.register_forward_hook(lambda *a: calls.__setitem__("defense", calls["defense"] + 1))
    adaptive = attack(steps=2, eot=2, shortlist=2, heldout_draws=3)
    adaptive(defense, x, y, ids)
    # 3 gradient estimates of 2 draws, then 2 shortlisted iterates and the clean start on 3 held-out draws
    assert calls["defense"] == (2 + 1) * 2 + (2 + 1) * 3
    assert calls["score"] == calls["defense"]
    assert defense.draw == (2 + 1) * 2 + 3  # the candidates share 3 held-out draws the gradient never used


def test_surrogate_gradient_chooses_the_output_on_the_scored_defense(classifier, digits):
    """With gradient = "surrogate" the held-out choice among candidates runs the full defense, not the
    1-step chain the gradient followed (same held-out draws, from the shared counter)."""
    x, y, ids = digits
    defense = ssni_defense(classifier, x, t_star=200, steps=6).eval()
    surrogate = gradient_target(defense, "surrogate", 1)
    assert surrogate.scored is defense
    adaptive = attack()
    x_adv = adaptive(surrogate, x, y, ids)
    heldout = defense.draw - adaptive.heldout_draws  # the held-out draws are the attack's last
    chosen = {}
    for name, model in (("defense", defense), ("surrogate", surrogate)):
        defense.draw = heldout
        chosen[name] = adaptive._select(model, y, ids)
    assert not torch.equal(chosen["defense"], chosen["surrogate"])  # the two chains disagree on some sample
    assert torch.equal(x_adv, chosen["defense"])


def test_gradient_reaches_the_score_network(classifier, digits):
    x, y, ids = digits
    defense = ssni_defense(classifier, x)
    adaptive = attack(score_target=0.0)  # far above the target: the penalty is active
    adaptive._set_target(defense, x, ids)
    adaptive._lam, adaptive._rows = torch.ones(len(x)), []
    x_var = x.clone().requires_grad_(True)
    loss, _ = adaptive.objective(defense, x_var, y, ids, torch.zeros(len(x), dtype=torch.long))
    loss.sum().backward()
    grads = [p.grad for p in defense.ssni.score_model.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0 and x_var.grad.abs().sum() > 0
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
    cfg = from_dict({"attacks": [{"name": "adaptive", "score_target": "mu", "score_weight": 2.0,
                                  "loss": "margin"}, {"name": "transfer", "restarts": 2}]})
    adaptive, target = build_attack(cfg.attacks[0], defense, seed=3)
    assert isinstance(adaptive, AdaptiveAttack) and target is defense
    assert (adaptive.score_target, adaptive.penalty, adaptive.loss, adaptive.seed) == ("mu", 2.0, "margin", 3)
    transfer, target = build_attack(cfg.attacks[1], defense, seed=3)
    assert isinstance(transfer, TransferAttack) and isinstance(transfer.attack, APGD)
    assert transfer.attack.restarts == 2
    for bad in ({"name": "transfer", "gradient": "surrogate"}, {"name": "adaptive", "score_target": "x"}):
        with pytest.raises(ConfigError):
            build_attack(from_dict({"attacks": [bad]}).attacks[0], defense, 0)
