"""Gradient modes of the attacks (exact | surrogate | bpda) and the calibration's own seed."""

import json

import pytest
import torch

from ssni import SSNI, Calibration, Defense, DiffPure, SampleNoise, VPSchedule, make_reweight, score_norm
from ssni.attacks import PGD
from ssni.attacks.bpda import BPDA
from ssni.attacks.gradient_modes import (SurrogateDefense, cosine_checks, eot_gradient, gradient_cosines,
                                         gradient_target)
from ssni.errors import ConfigError
from ssni.evaluate.build import build_attack, calibrate
from ssni.evaluate.config import AttackConfig, from_dict


def defense_of(unet, classifier, ssni=True, steps=6, votes=1):
    purifier = DiffPure(unet, t_star=12, steps=steps)
    layer = None
    if ssni:
        reference = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            cal = Calibration.fit(score_norm(unet, VPSchedule(), reference, SampleNoise.from_ids(5, range(8)), 2))
        layer = SSNI(unet, make_reweight("sigmoid", cal), n_levels=2)
    return Defense(classifier, purifier, layer, seed=3, votes=votes).eval()


def test_surrogate_is_the_same_defense_with_a_shorter_chain(tiny_unet, tiny_classifier, images):
    defense = defense_of(tiny_unet, tiny_classifier)
    surrogate = gradient_target(defense, "surrogate", 3)
    assert isinstance(surrogate, SurrogateDefense) and surrogate.purifier.steps == 3
    assert defense.purifier.steps == 6 and defense.ssni.differentiable  # the defense is untouched
    assert surrogate.classifier is defense.classifier and surrogate.purifier.model is defense.purifier.model
    assert not surrogate.ssni.differentiable and surrogate.seed == defense.seed
    ids = torch.arange(5)
    with torch.no_grad():  # same draw -> same score-norm noise -> same levels
        assert torch.equal(surrogate.explain(images, ids, draw=4)["t_star"],
                           defense.explain(images, ids, draw=4)["t_star"])
        # with as many steps as the defense, the surrogate's forward value is the defense's
        same = gradient_target(defense, "surrogate", 6)
        assert torch.allclose(same(images, ids, draw=2), defense(images, ids, draw=2), atol=1e-6)
        assert not torch.allclose(surrogate(images, ids, draw=2), defense(images, ids, draw=2), atol=1e-4)


def test_surrogate_shares_the_defense_draw_counter(tiny_unet, tiny_classifier):
    defense = defense_of(tiny_unet, tiny_classifier)
    surrogate, bpda = gradient_target(defense, "surrogate", 2), gradient_target(defense, "bpda")
    defense.draw = 100
    assert surrogate.reserve_draws(3) == 100 and bpda.reserve_draws(1) == 103 and defense.draw == 104


def test_surrogate_levels_are_constants_for_the_gradient(tiny_unet, tiny_classifier, images):
    defense = defense_of(tiny_unet, tiny_classifier)
    surrogate = gradient_target(defense, "surrogate", 3)
    x = images.clone().requires_grad_(True)
    _, levels = surrogate.purify(x, torch.arange(5), draw=0)
    assert levels.t_relaxed is None and not levels.score_norm.requires_grad
    _, levels = defense.purify(x, torch.arange(5), draw=0)
    assert levels.t_relaxed is not None and levels.t_relaxed.requires_grad


def test_bpda_takes_fixed_and_per_row_draws(tiny_unet, tiny_classifier, images):
    defense = defense_of(tiny_unet, tiny_classifier, ssni=False)
    bpda, ids = BPDA(defense), torch.arange(5)
    with torch.no_grad():
        assert torch.allclose(bpda(images, ids, draw=7), defense(images, ids, draw=7), atol=1e-6)
        rows = bpda(images.repeat(2, 1, 1, 1), ids.repeat(2), draw=torch.tensor([7] * 5 + [8] * 5))
        assert torch.allclose(rows[5:], defense(images, ids, draw=8), atol=1e-6)
    # stacked EOT through BPDA == one draw per pass
    y = torch.zeros(5, dtype=torch.long)
    grads = []
    for eot_batch in (1, 2):
        defense.draw = 50
        grads.append(PGD(eot=2, eot_batch=eot_batch).gradient(bpda, images, y, ids)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_build_attack_chooses_the_target_by_gradient_mode(tiny_unet, tiny_classifier):
    defense = defense_of(tiny_unet, tiny_classifier)
    assert build_attack(AttackConfig(), defense, 0)[1] is defense
    assert isinstance(build_attack(AttackConfig(name="bpda"), defense, 0)[1], BPDA)  # the old name still works
    assert isinstance(build_attack(AttackConfig(gradient="bpda"), defense, 0)[1], BPDA)
    attack, target = build_attack(AttackConfig(gradient="surrogate", surrogate_steps=4), defense, 0)
    assert isinstance(attack, PGD) and isinstance(target, SurrogateDefense) and target.purifier.steps == 4
    assert isinstance(build_attack(AttackConfig(name="adaptive", gradient="surrogate"), defense, 0)[1],
                      SurrogateDefense)
    for bad in (AttackConfig(name="bpda", gradient="surrogate"), AttackConfig(name="adaptive", gradient="bpda"),
                AttackConfig(name="autoattack", gradient="surrogate")):
        with pytest.raises(ConfigError, match="cannot take gradient"):
            build_attack(bad, defense, 0)
    with pytest.raises(ConfigError, match="needs a purifier"):
        build_attack(AttackConfig(gradient="surrogate"), tiny_classifier, 0)
    with pytest.raises(ConfigError, match="surrogate_steps"):
        build_attack(AttackConfig(gradient="surrogate", surrogate_steps=0), defense, 0)
    with pytest.raises(ConfigError, match="choose one of"):
        from_dict({"attacks": [{"gradient": "straight-through"}]})


def test_gradient_cosines(tiny_unet, tiny_classifier, images):
    defense = defense_of(tiny_unet, tiny_classifier)
    y, ids = torch.arange(5), torch.arange(5)
    cos = gradient_cosines(defense, images, y, ids, eot=2, surrogate_steps=2)
    assert set(cos) == {"exact", "surrogate", "bpda"}
    for c in cos.values():
        assert -1 <= c["min"] <= c["mean"] <= 1 and c["n"] == 5 and c["eot"] == 2
    checks = cosine_checks(cos, 2)
    assert len(checks) == 3 and "2 steps" in checks[1]["check"]
    assert all(c["informative"] and c["passed"] is None for c in checks)  # no threshold: described, not judged
    assert checks[2]["mean"] == cos["bpda"]["mean"] and f"{cos['bpda']['mean']:.3f}" in checks[2]["detail"]


def test_fixed_draw_gradient_is_pgd_gradient_and_leaves_the_counter(tiny_unet, tiny_classifier, images):
    """``eot_gradient`` (fixed draws 40, 41, 42) == PGD's EOT gradient on the counter's draws 40..42,
    stacked or not; the fixed draws do not move the counter."""
    defense = defense_of(tiny_unet, tiny_classifier)
    y, ids = torch.arange(5), torch.arange(5) + 11
    fixed = eot_gradient(defense, images, y, ids, 40, 3)
    assert defense.draw == 0
    for eot_batch in (1, 2):
        defense.draw = 40
        grad = PGD(eot=3, eot_batch=eot_batch).gradient(defense, images, y, ids)[0]
        assert defense.draw == 43 and torch.allclose(grad, fixed, atol=1e-6)
    for mode in ("surrogate", "bpda"):
        target = gradient_target(defense, mode, 2)
        defense.draw = 40
        assert torch.allclose(PGD(eot=3).gradient(target, images, y, ids)[0],
                              eot_gradient(target, images, y, ids, 40, 3), atol=1e-6)


def test_surrogate_and_fixed_level_defenses_share_the_draw_counter_and_name_the_scored_defense(
        tiny_unet, tiny_classifier):
    from ssni.attacks.transfer import FixedLevelDefense
    defense = defense_of(tiny_unet, tiny_classifier, votes=2)
    fixed = FixedLevelDefense(defense, {})
    surrogate = gradient_target(defense, "surrogate", 2)
    for derived in (fixed, surrogate):
        assert derived.scored is defense and derived.seed == 3 and derived.votes == 2
        assert derived.classifier is defense.classifier and not derived.training
    assert fixed.ssni is None and fixed.purifier is defense.purifier
    defense.draw = 7
    assert fixed.reserve_draws(2) == 7 and surrogate.reserve_draws(1) == 9 and defense.draw == 10


def test_surrogate_with_all_steps_and_constant_levels_is_the_exact_gradient(tiny_unet, tiny_classifier, images):
    defense = defense_of(tiny_unet, tiny_classifier)
    defense.ssni.differentiable = False  # then the only difference left is the chain length
    y, ids = torch.arange(5), torch.arange(5)
    cos = gradient_cosines(defense, images, y, ids, modes=("surrogate",), eot=1, surrogate_steps=6)
    assert cos["surrogate"]["min"] > 0.9999


CALIBRATION_CONFIG = {"data": {"n": 4}, "purifier": {"t_star": 20, "steps": 2},
                      "ssni": {"reweight": "sigmoid", "n_levels": 2, "calibration_size": 8}}


def test_calibration_does_not_depend_on_the_evaluation_seed(tiny_unet, tiny_weights):
    cals = [calibrate(from_dict({**CALIBRATION_CONFIG, "evaluate": {"seed": s}}), tiny_unet, tiny_weights)
            for s in (121, 122, 123)]
    assert cals[0] == cals[1] == cals[2] and cals[0].meta["seed"] == 0
    other = from_dict({**CALIBRATION_CONFIG, "ssni": {**CALIBRATION_CONFIG["ssni"], "calibration_seed": 1}})
    assert calibrate(other, tiny_unet, tiny_weights).mean != cals[0].mean


def test_calibration_on_held_out_images_and_its_own_file(tmp_path, tiny_unet, tiny_weights):
    file = tmp_path / "cal" / "ref.json"
    ssni = {**CALIBRATION_CONFIG["ssni"], "calibration_split": "val", "calibration_file": str(file)}
    cfg = from_dict({**CALIBRATION_CONFIG, "ssni": ssni})
    cal = calibrate(cfg, tiny_unet, tiny_weights)
    assert cal.meta["split"] == "mnist-5k/val" and file.is_file()
    assert Calibration.load(file) == cal
    train = calibrate(from_dict(CALIBRATION_CONFIG), tiny_unet, tiny_weights)
    assert train.mean != cal.mean
    with torch.no_grad():  # the file is used, not recomputed: a different network gives the same numbers
        for p in tiny_unet.parameters():
            p.add_(0.1)
    assert calibrate(cfg, tiny_unet, tiny_weights) == cal
    with pytest.raises(ConfigError, match="other settings"):
        calibrate(from_dict({**CALIBRATION_CONFIG, "ssni": {**ssni, "calibration_size": 4}}), tiny_unet,
                  tiny_weights)
    with pytest.raises(ConfigError, match="evaluated split"):
        calibrate(from_dict({**CALIBRATION_CONFIG, "data": {"split": "val"}, "ssni": ssni}), tiny_unet,
                  tiny_weights)


def test_evaluate_runs_an_attack_through_the_surrogate(tmp_path, tiny_weights):
    from ssni.evaluate.runner import evaluate

    attack = {"name": "pgd", "eps": 0.3, "steps": 1, "step_size": 0.1, "eot": 1, "gradient": "surrogate",
              "surrogate_steps": 1}
    cfg = from_dict({**CALIBRATION_CONFIG, "data": {"n": 2}, "attacks": [attack], "evaluate": {"batch_size": 2}})
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
    assert (tmp_path / "run" / "results.sqlite").is_file()


def test_sanity_runs_the_configured_gradient_mode_and_lists_the_gradient_cosines(tiny_weights, monkeypatch):
    from ssni.attacks import checks as checks_module
    from ssni.evaluate.runner import run_sanity

    attack = {"name": "pgd", "eps": 0.3, "steps": 1, "step_size": 0.1, "eot": 1, "gradient": "surrogate",
              "surrogate_steps": 1}
    cfg = from_dict({**CALIBRATION_CONFIG, "data": {"n": 2}, "attacks": [attack]})
    targets, sanity_checks = [], checks_module.sanity_checks
    monkeypatch.setattr(checks_module, "sanity_checks",
                        lambda *args: targets.append(args[-1]) or sanity_checks(*args))
    result = run_sanity(cfg, tiny_weights, n=2)
    checks = result["checks"]
    assert isinstance(targets[0], SurrogateDefense) and targets[0].purifier.steps == 1  # not the exact defense
    assert "surrogate gradient at least as strong as BPDA" in [c["check"] for c in checks]
    convergence = [c for c in checks if c["check"].startswith("attack converged")]
    assert len(convergence) == 2 and all("NO VERDICT" in c["detail"] for c in convergence)  # 2 samples only
    assert not result["all_passed"]
    cosines = [c for c in checks if c["check"].startswith("gradient cosine to exact")]
    assert [c["check"].split(": ")[1].split(" ")[0] for c in cosines] == ["exact", "surrogate", "bpda"]
    assert "(1 steps)" in cosines[1]["check"] and all(c["n"] == 2 and c["eot"] == 1 for c in cosines)
    bpda = from_dict({**CALIBRATION_CONFIG, "data": {"n": 2}, "attacks": [{**attack, "gradient": "bpda"}]})
    run_sanity(bpda, tiny_weights, n=2)
    assert isinstance(targets[1], BPDA)


def test_a_derived_defense_leaves_the_shared_networks_in_their_mode():
    """Building a surrogate must not switch the defense's networks to training mode (it did when the
    defense's own flag said training while its networks were in eval mode)."""
    import torch

    from ssni import Defense, DiffPure
    from ssni.attacks.gradient_modes import SurrogateDefense

    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).eval()
    unet = torch.nn.Conv2d(1, 1, 1).eval()
    defense = Defense(classifier, DiffPure(unet, t_star=10, steps=2), None)
    defense.training = True  # the wrapper's own flag only
    surrogate = SurrogateDefense(defense, 1)
    assert not classifier.training and not unet.training and surrogate.training


def test_sanity_after_an_auto_run_uses_the_runs_speed_settings(tmp_path, tiny_weights):
    """``--sanity`` on a config with ``"auto"`` speed keys (every paper preset) crashed after the whole
    evaluation: the attacks were built from the unresolved config (``eot_batch = "auto"``)."""
    from ssni.evaluate.report import speed_of_run, summarize_run
    from ssni.evaluate.runner import evaluate

    attack = {"name": "pgd", "eps": 0.3, "steps": 1, "step_size": 0.1, "eot": 2, "eot_batch": "auto"}
    cfg = from_dict({**CALIBRATION_CONFIG, "data": {"n": 2}, "attacks": [attack],
                     "purifier": {**CALIBRATION_CONFIG["purifier"], "checkpoint": "auto"},
                     "evaluate": {"batch_size": "auto"}})
    evaluate(cfg, tmp_path / "run", tiny_weights, progress=False)
    run = speed_of_run(tmp_path / "run", cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run.hash() == cfg.hash() and run.evaluate.batch_size == saved["evaluate"]["batch_size"] != "auto"
    assert run.attacks[0].eot_batch == saved["attacks"][0]["eot_batch"] != "auto"
    assert "sanity" in summarize_run(tmp_path / "run", cfg, tiny_weights, sanity_n=2).lower()
