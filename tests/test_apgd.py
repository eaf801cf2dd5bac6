import importlib.util
import sys

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


# --- Reference trace: AutoAttack's APGD (pyautoattack's autopgd_base.py) step by step ----------------------
#
# Both attacks run from the same start on the same model; a recording wrapper keeps every point at which a
# gradient is taken (every EOT draw) and, inside the reference's ``attack_single_run``, the step size and
# checkpoint counters of that iteration (read from its frame: the reference exposes no trace). A model
# with EOT noise draws it keyed by the number of gradient calls, so both attacks see the same draws.
# The reference is instrumented for the two documented differences (module docstring of
# ``ssni.attacks.apgd``) and nothing else: at its first checkpoint it reads the start loss where it reads
# an unwritten row of zeros, and with EOT its per-iterate loss is the mean over the draws where it keeps
# the last draw's (the gradient is still each draw's own).

needs_reference = pytest.mark.skipif(importlib.util.find_spec("pyautoattack") is None,
                                     reason="needs pyautoattack (the reference APGD)")


class Recorder(nn.Module):
    """``net`` (plus input noise of scale ``sigma`` keyed by the gradient call's index) that records
    every gradient call's input and, inside the reference, ``(i, counter3, k, step_size)``."""

    def __init__(self, net, sigma=0.0):
        super().__init__()
        self.net, self.sigma, self.points, self.reference = net, sigma, [], []

    def forward(self, x):
        if not x.requires_grad:  # clean passes (targets, predictions): no noise, not a step
            return self.net(x)
        self.points.append(x.detach().clone())
        self.reference.append(reference_locals(sys._getframe(1)))
        if self.sigma:
            gen = torch.Generator().manual_seed(len(self.points))
            x = x + self.sigma * torch.randn(x.shape, generator=gen)
        return self.net(x)


def reference_locals(frame):
    while frame is not None and frame.f_code.co_name != "attack_single_run":
        frame = frame.f_back
    loc = frame.f_locals if frame is not None else {}
    if "i" not in loc or "step_size" not in loc:  # not the reference, or its start point
        return None
    return loc["i"], loc["counter3"], loc["k"], loc["step_size"].flatten().clone()


def reference_apgd(model, norm, eps, steps, eot, loss, starts, restarts=1):
    """The reference, instrumented only as the comment above says; ``starts`` feed its runs' ``x_init``."""
    from pyautoattack.autopgd_base import APGDAttack_targeted

    class Reference(APGDAttack_targeted):  # the targeted class: it also holds the targeted losses
        def attack_single_run(self, x, y, x_init=None):
            self.draws, self.run_losses = [], []
            return super().attack_single_run(x, y, next(starts))

        def mean_over_draws(self, value):
            self.draws.append(value.detach())
            if len(self.draws) < self.eot_iter:
                return value
            mean, self.draws = torch.stack(self.draws).mean(0), []
            self.run_losses.append(mean)
            return value + (mean - value.detach())  # the mean's value, this draw's gradient

        def dlr_loss(self, z, y):
            return self.mean_over_draws(super().dlr_loss(z, y))

        def dlr_loss_targeted(self, z, y):
            return self.mean_over_draws(super().dlr_loss_targeted(z, y))

        def ce_loss(self, z, y):
            return self.mean_over_draws(torch.nn.functional.cross_entropy(z, y, reduction="none"))

        def check_oscillation(self, x, j, k, y5, k3=0.75):
            if j - k == -1:  # first checkpoint: the start loss, not the unwritten last row
                x = x.clone()
                x[-1] = self.run_losses[0]
            return super().check_oscillation(x, j, k, y5, k3)

    ref = Reference(model, n_iter=steps, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, eot_iter=eot,
                    n_restarts=restarts)
    ref.loss = loss
    return ref


def reference_ce(monkeypatch, ref):
    """The reference builds its untargeted CE as ``nn.CrossEntropyLoss`` inside the run: route it through
    the instrumented one."""
    from pyautoattack import autopgd_base

    monkeypatch.setattr(autopgd_base.nn, "CrossEntropyLoss", lambda reduction: ref.ce_loss)


def ours_from(monkeypatch, starts):
    """Our APGD's random starts replaced by the given ones, in order."""
    monkeypatch.setattr(ThreatModel, "random_point", lambda self, x, noise: next(starts))


def start_points(x, norm, eps, count=1):
    gen = torch.Generator().manual_seed(1)
    scale = 1.0 if norm == "linf" else 0.05  # l_2: a small uniform start, well inside the ball
    return [ThreatModel(norm, eps).project(x + scale * eps * (2 * torch.rand(x.shape, generator=gen) - 1), x)
            for _ in range(count)]


def assert_same_trace(ours: APGD, mine: Recorder, theirs: Recorder, eps: float, runs: int, atol: float):
    """Every gradient point, every step size and every checkpoint of ``runs`` runs agree."""
    assert len(mine.points) == len(theirs.points) == runs * (ours.steps + 1) * ours.eot
    for p, q in zip(mine.points, theirs.points):
        assert torch.allclose(p, q, atol=atol, rtol=0)
    per_iteration = [r for r in theirs.reference if r is not None][::ours.eot]  # one per iteration and run
    eta = torch.stack([r[3] for r in per_iteration])  # the step that produced the iterate
    steps = torch.stack(ours.step_trace)  # ours: after each iteration (halved at its checkpoint)
    first = torch.full_like(steps[:1], 2 * eps)
    for run in range(runs):
        block = slice(run * ours.steps, (run + 1) * ours.steps)
        assert torch.equal(eta[block], torch.cat([first, steps[block][:-1]]))
        checks = [i + 1 for i, counter, k, _ in per_iteration[block] if counter + 1 == k]
        assert checks == checkpoint_steps(ours.steps)
    halved = steps[-1] < 2 * eps
    assert halved.any() and (steps[-1] < steps[-1].max()).any()  # the trace exercised halving, not everywhere


@needs_reference
@pytest.mark.parametrize("norm,eps,loss,eot", [("linf", 0.1, "dlr", 1), ("l2", 1.5, "dlr", 1), ("linf", 0.1, "ce", 1),
                                               ("linf", 0.1, "dlr", 2), ("l2", 1.5, "ce", 2)])
def test_apgd_follows_the_reference_trace_step_by_step(norm, eps, loss, eot, classifier, digits, one_thread,
                                                        monkeypatch):
    x, y = digits[0][:8], digits[1][:8]
    (start,) = start_points(x, norm, eps)
    theirs, mine = Recorder(classifier, 0.1 * (eot > 1)), Recorder(classifier, 0.1 * (eot > 1))
    ref = reference_apgd(theirs, norm, eps, 25, eot, loss, iter([start]))  # periods 5, 4, 3, 2, 1
    reference_ce(monkeypatch, ref)
    ref.init_hyperparam(x)
    x_ref, _, loss_ref, _ = ref.attack_single_run(x, y)
    ours_from(monkeypatch, iter([start]))
    attack = APGD(ThreatModel(norm, eps), steps=25, eot=eot, loss=loss)
    out = attack(mine, x, y)
    atol = 1e-6 if norm == "linf" else 1e-5  # l_2: the two normalisations round differently (1e-12 terms)
    assert_same_trace(attack, mine, theirs, eps, runs=1, atol=atol)
    assert torch.allclose(out, x_ref, atol=atol, rtol=0)  # the best iterate


@needs_reference
def test_apgd_restarts_keep_the_reference_best_loss_output(classifier, digits, one_thread, monkeypatch):
    x, y = digits[0][:8], digits[1][:8]
    starts = start_points(x, "linf", 0.1, count=3)
    theirs, mine = Recorder(classifier, 0.1), Recorder(classifier, 0.1)
    ref = reference_apgd(theirs, "linf", 0.1, 10, 2, "dlr", iter(starts), restarts=3)
    from pyautoattack.autopgd_base import APGDAttack

    x_ref = APGDAttack.perturb(ref, x, y, best_loss=True)  # the reference's own restart loop and choice
    ours_from(monkeypatch, iter(starts))
    attack = APGD(ThreatModel("linf", 0.1), steps=10, eot=2, restarts=3)
    out = attack(mine, x, y)
    assert_same_trace(attack, mine, theirs, 0.1, runs=3, atol=1e-6)
    assert torch.allclose(out, x_ref, atol=1e-6, rtol=0)
    firsts = [(r * 11 + 10) * 2 for r in range(3)]  # each run's last iterate: the restarts differ
    assert not torch.allclose(mine.points[firsts[0]], mine.points[firsts[1]])


@needs_reference
def test_targeted_apgd_follows_the_reference_per_target(classifier, digits, one_thread, monkeypatch):
    x, y = digits[0][:8], digits[1][:8]
    (start,) = start_points(x, "linf", 0.15)
    with torch.no_grad():
        z = classifier(x)
    assert (z.argmax(1) == y).all()
    theirs, mine = Recorder(classifier), Recorder(classifier)
    ours_from(monkeypatch, iter([start, start]))
    attack = APGD(ThreatModel("linf", 0.15), steps=12, targeted=True, target_classes=2, loss="dlr")
    out = attack(mine, x, y)
    ref = reference_apgd(theirs, "linf", 0.15, 12, 1, "dlr-targeted", iter([start, start]))
    ref.init_hyperparam(x)
    runs = []
    for target_class in (2, 3):  # the reference's own choice of target: the 2nd and 3rd most likely class
        ref.y_target = z.sort(dim=1)[1][:, -target_class]
        runs.append(ref.attack_single_run(x, y)[::2])  # (best iterate, its loss)
    assert_same_trace(attack, mine, theirs, 0.15, runs=2, atol=1e-6)
    best = torch.stack([loss for _, loss in runs]).argmax(0)  # ours keeps the target run of highest loss
    expected = torch.stack([xb for xb, _ in runs])[best, torch.arange(8)]
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


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
