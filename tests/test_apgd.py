import importlib.util

import pytest
import torch
from torch import nn

from ssni import Defense, DiffPure
from ssni.attacks import APGD, ThreatModel
from ssni.attacks.apgd import checkpoint_steps, dlr_loss, margin_loss, stalled
from ssni.attacks.bpda import BPDA
from ssni.checkpoints.registry import default_weights_dir, load_named
from ssni.data import load_split
from ssni.denoisers import UNet, UNetConfig
from ssni.errors import ConfigError
from ssni.evaluate.build import build_attack
from ssni.evaluate.config import AttackConfig, from_dict


@pytest.fixture(scope="module")
def digits():
    test = load_split("mnist-5k", "test").head(64)
    return test.images, test.labels


@pytest.fixture(scope="module")
def classifier():
    return load_named("mnist-cnn", default_weights_dir())


@pytest.fixture
def one_thread():
    """The small CNN runs faster on one thread when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def robust(model, x, y) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


@pytest.mark.skipif(importlib.util.find_spec("pyautoattack") is None, reason="needs pyautoattack")
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_matches_the_reference_apgd_on_an_undefended_classifier(norm, eps, loss, classifier, digits,
                                                                     one_thread):
    from pyautoattack.autopgd_base import APGDAttack

    x, y = digits
    ours = APGD(ThreatModel(norm, eps), steps=20, loss=loss)(classifier, x, y)
    torch.manual_seed(0)
    reference = APGDAttack(classifier, n_iter=20, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, loss=loss,
                           seed=0).perturb(x, y, best_loss=True)
    assert robust(classifier, x, y) >= 60
    assert abs(robust(classifier, ours, y) - robust(classifier, reference, y)) <= 2
    delta = (ours - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5 and ours.min() >= 0 and ours.max() <= 1


def test_checkpoints_follow_the_shrinking_periods():
    # N = 100: first check after 22, periods shrink by 3 down to 6
    assert checkpoint_steps(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoint_steps(5) == [1, 2, 3, 4, 5]


def test_stall_conditions():
    rising = [torch.tensor([float(k)]) for k in range(5)]
    flat = [torch.tensor([1.0])] * 5
    no, yes = torch.tensor([False]), torch.tensor([True])
    best_then, best_now = torch.tensor([3.0]), torch.tensor([4.0])
    assert not stalled(rising, 4, 0.75, no, best_then, best_now)  # every step rose, best improved
    assert stalled(flat, 4, 0.75, yes, best_then, best_now)  # (1): no step rose
    assert stalled(rising, 4, 0.75, no, best_now, best_now)  # (2): not halved before, best unchanged
    assert not stalled(rising, 4, 0.75, yes, best_now, best_now)  # (2) needs an unhalved step


class Toy(nn.Module):
    """Logits that ignore the input (zero gradient): constant, or rising with every call."""

    def __init__(self, rising: bool):
        super().__init__()
        self.rising, self.calls = rising, 0

    def forward(self, x):
        self.calls += 1
        base = torch.tensor([float(self.calls) if self.rising else 0.0, 0.0, -1.0])
        return base + 0 * x.flatten(1)[:, :3]


@pytest.mark.parametrize("rising", [False, True])
def test_step_halves_exactly_at_checkpoints_when_the_loss_stalls(rising):
    x, y = torch.full((2, 1, 4, 4), 0.5), torch.tensor([1, 1])
    attack = APGD(ThreatModel("linf", 0.1), steps=20, loss="margin")
    attack(Toy(rising), x, y)
    eta = torch.stack(attack.step_trace)[:, 0]
    halvings = [i + 1 for i in range(20) if eta[i] < (eta[i - 1] if i else 0.2) - 1e-9]
    assert halvings == ([] if rising else checkpoint_steps(20))
    assert torch.isclose(eta[-1], torch.tensor(0.2 / 2 ** len(halvings)))


def test_best_iterate_has_at_least_the_loss_of_the_last(classifier, digits, one_thread):
    x, y = digits[0][:8], digits[1][:8]
    outputs = {it: APGD(ThreatModel("linf", 0.1), steps=5, iterate=it)(classifier, x, y)
               for it in ("best", "last")}
    with torch.no_grad():
        best, last = (dlr_loss(classifier(outputs[it]), y, None) for it in ("best", "last"))
    assert (best >= last - 1e-5).all() and (best > last + 1e-3).any()


def test_a_sample_gets_the_same_attack_alone_and_in_a_batch(classifier, digits, one_thread):
    x, y, ids = digits[0][:4], digits[1][:4], torch.tensor([7, 3, 11, 5])
    for steps, restarts in ((4, 1), (0, 3)):  # whole runs; random starts of several restarts and the choice
        attack = APGD(ThreatModel("l2", 1.0), steps=steps, restarts=restarts, seed=3)
        batch = attack(classifier, x, y, ids)
        alone = attack(classifier, x[2:3], y[2:3], ids[2:3])
        assert torch.allclose(batch[2:3], alone, atol=1e-5)
        other_id = attack(classifier, x[2:3], y[2:3], torch.tensor([12]))
        assert not torch.allclose(batch[2:3], other_id, atol=1e-3)
    one, three = (APGD(ThreatModel("l2", 1.0), steps=0, restarts=r, seed=3)(classifier, x, y, ids)
                  for r in (1, 3))
    assert not torch.allclose(one, three)  # a later restart's start won somewhere


def test_losses_closed_forms():
    z = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    y, t = torch.tensor([1]), torch.tensor([2])
    assert torch.allclose(margin_loss(z, y, None), torch.tensor([2.0]))
    assert torch.allclose(margin_loss(z, y, t), torch.tensor([-3.0]))
    assert torch.allclose(dlr_loss(z, y, None), torch.tensor([2.0 / 3.0]))
    assert torch.allclose(dlr_loss(z, y, t), torch.tensor([-1.0 / 4.0]))
    assert torch.allclose(dlr_loss(5 * z + 7, y, None), dlr_loss(z, y, None))  # shift and scale invariant


def test_targeted_apgd_fools_and_tracks_any_iterate(classifier, digits, one_thread):
    x, y = digits[0][:8], digits[1][:8]
    attack = APGD(ThreatModel("linf", 0.15), steps=8, targeted=True, target_classes=2, loss="ce")
    x_adv = attack(classifier, x, y)
    assert robust(classifier, x_adv, y) <= 2
    assert len(attack.loss_trace) == 2 * 9 and len(attack.step_trace) == 2 * 8
    assert attack.fooled_any_iterate.sum() >= 8 - robust(classifier, x_adv, y)


def tiny_defense(classifier, seed=0):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2))).eval()
    return Defense(classifier, DiffPure(unet, t_star=30, steps=3), seed=seed)


def test_stacked_eot_draws_give_the_same_apgd_as_one_draw_per_pass(classifier, digits):
    x, y, ids = digits[0][:3], digits[1][:3], torch.tensor([7, 3, 11])
    results = []
    for eot_batch in (1, 4, 3):
        defense = tiny_defense(classifier)
        x_adv = APGD(ThreatModel("linf", 0.3), steps=2, eot=4, eot_batch=eot_batch)(defense, x, y, ids)
        results.append((x_adv, defense.draw))
    for x_adv, draws in results[1:]:
        assert torch.allclose(x_adv, results[0][0], atol=1e-6) and draws == results[0][1] == 12


def test_apgd_is_registered_and_checks_its_settings(classifier):
    cfg = from_dict({"attacks": [{"name": "apgd", "loss": "margin", "restarts": 2, "iterate": "last"}]})
    attack, target = build_attack(cfg.attacks[0], classifier, seed=4)
    assert isinstance(attack, APGD) and target is classifier
    settings = (attack.loss, attack.restarts, attack.iterate, attack.seed, attack.targeted)
    assert settings == ("margin", 2, "last", 4, False)
    assert AttackConfig().loss == "dlr"
    defense = tiny_defense(classifier)
    cfg = from_dict({"attacks": [{"name": "apgd", "gradient": "bpda", "steps": 1, "eot": 1}]})
    attack, target = build_attack(cfg.attacks[0], defense, seed=0)
    assert isinstance(target, BPDA) and target is not defense  # the gradient modes reach APGD as they reach PGD
    two = load_split("mnist-5k", "test").head(2)
    assert attack(target, two.images, two.labels, two.ids).shape == two.images.shape
    with pytest.raises(ConfigError):
        from_dict({"attacks": [{"name": "apgd", "loss": "hinge"}]})
    with pytest.raises(ConfigError):
        APGD(iterate="first")
