"""ssni evaluate --plan: the counts it predicts, the memory it measures, the join plan it relies on."""

from dataclasses import replace

import torch

from ssni import Calibration, Defense, DiffPure, SampleNoise, SSNI, VPSchedule, make_reweight, score_norm
from ssni.evaluate.config import AttackConfig, ExperimentConfig
from ssni.evaluate.costs import _inference_memory, attack_cost, attack_row_bytes, steps_per_sample
from ssni.evaluate.plan import format_plan, make_plan
from ssni.evaluate.units import Units, peak_live_bytes, saved_bytes
from ssni.purifiers.schedule import join_plan, unique_grid


def units(**kw) -> Units:
    base = dict(step=1.0, step_grad=3.0, step_ck=4.0, classifier=0.5, classifier_grad=1.5, step_saved_bytes=100.0,
                step_input_bytes=10.0, classifier_saved_bytes=7.0, weight_bytes=0)
    return Units(**{**base, **kw})


def test_attack_cost_counts_iterations_eot_votes_and_recompute():
    a = AttackConfig(name="pgd", steps=3, eot=2)
    u = units()
    # per draw: (score rows + reverse steps) x (fwd+bwd, or checkpointed) + classifier fwd+bwd
    assert attack_cost(a, u, score=4, reverse=10, votes=1, checkpointed=False) == 3 * 2 * (4 * 3 + 10 * 3 + 1.5)
    assert attack_cost(a, u, score=4, reverse=10, votes=2, checkpointed=True) == 3 * 2 * 2 * (4 * 4 + 10 * 4 + 1.5)
    apgd = AttackConfig(name="apgd", steps=3, eot=2, restarts=2)
    assert attack_cost(apgd, u, 0, 10, 1, False) == 2 * attack_cost(a, u, 0, 10, 1, False)


def test_attack_cost_counts_targets_and_surrogate_steps_per_round():
    u = units()
    untargeted = AttackConfig(name="apgd", steps=3, eot=1)
    targeted = AttackConfig(name="apgd", steps=3, eot=1, targeted=True)
    assert attack_cost(targeted, u, 0, 10, 1, False) == 9 * attack_cost(untargeted, u, 0, 10, 1, False)
    surrogate = AttackConfig(name="pgd", steps=1, eot=1, gradient="surrogate", surrogate_steps=5)
    # 4 rounds of up to 5 surrogate steps: 20 of the chain's 30 steps are differentiated
    assert attack_cost(surrogate, u, 0, 30, 1, False, rounds=4) == 20 * 3 + 1.5
    assert attack_cost(surrogate, u, 0, 12, 1, False, rounds=4) == 12 * 3 + 1.5  # never more than the chain
    assert attack_cost(surrogate, u, 4, 12, 1, False, rounds=4) == 4 * 1 + 12 * 3 + 1.5  # levels without gradient


def test_plan_run_refuses_a_config_mistake_and_probes_missing_data_in_its_shape(tmp_path):
    import pytest

    from ssni.errors import ConfigError
    from ssni.evaluate.config import load_config
    from ssni.evaluate.plan import plan_run

    path = tmp_path / "exp.toml"
    path.write_text('[data]\ndataset = "mnist-5k"\nsplit = "train"\nn = 2\n[purifier]\nmethod = "diffpure"\n'
                    '[ssni]\nreweight = "sigmoid"\ncalibration_split = "train"\n[[attacks]]\nname = "pgd"\nsteps = 1\n')
    with pytest.raises(ConfigError, match="calibration_split"):  # was swallowed: a probe calibration was used
        plan_run(load_config(path), probe=2)
    path.write_text('[data]\ndataset = "fashion-mnist"\nroot = "%s"\nn = 2\n[models]\ndiffusion = "mnist-unet"\n'
                    'classifier = "mnist-cnn"\n[purifier]\nmethod = "diffpure"\nsteps = 2\n[[attacks]]\nname = "pgd"\n'
                    'steps = 1\neot = 1\n' % (tmp_path / "absent"))
    plan = plan_run(load_config(path), probe=2)  # no Fashion-MNIST here: a [2, 1, 28, 28] noise probe
    assert plan["synthetic_probe"] and plan["seconds"] > 0


def test_plan_counts_a_calibration_the_run_must_fit_instead_of_running_it(write_toml):
    from ssni.evaluate.config import load_config
    from ssni.evaluate.plan import plan_run

    path = write_toml('[data]\ndataset = "mnist-5k"\nsplit = "test"\nn = 2\n[models]\ndiffusion = "mnist-unet"\n'
                      'classifier = "mnist-cnn"\n[purifier]\nmethod = "diffpure"\nsteps = 2\n[ssni]\nreweight = "sigmoid"\n'
                      'n_levels = 3\ncalibration_size = 4000\ncalibration_split = "train"\n[[attacks]]\nname = "pgd"\n'
                      'steps = 1\neot = 1\n')
    plan = plan_run(load_config(path), probe=2)  # no saved calibration of 4,000 images: fitting one takes minutes
    assert plan["calibration_images"] == 4000
    assert plan_run(load_config(path), probe=1)["seconds"] > 0  # one probe image still calibrates (two draws)
    assert plan["calibration_seconds"] == 4000 * 3 * plan["units"]["step"] > 0
    assert "calibration" in format_plan(plan) and plan["seconds"] >= plan["calibration_seconds"]


def test_checkpointing_keeps_step_inputs_only():
    u = units()
    assert attack_row_bytes(u, score=0, reverse=10, checkpointed=False) == 10 * 100 + 7
    assert attack_row_bytes(u, score=0, reverse=10, checkpointed=True) == 10 * 10 + 100 + 7
    # the score-norm rows are checkpointed with the chain: their inputs kept, one call's activations live
    assert attack_row_bytes(u, score=4, reverse=10, checkpointed=False) == 14 * 100 + 7
    assert attack_row_bytes(u, score=4, reverse=10, checkpointed=True) == 14 * 10 + 100 + 7


def test_peak_live_bytes_counts_tensors_alive_at_once_and_not_the_callers():
    x = torch.randn(100, 100)  # made before the count: its views and in-place updates are not counted
    size = x.nbytes

    def pass_():
        a = x * 2
        b = a + 1
        del a  # freed: c below reuses nothing, but the peak stays at two tensors
        c = b * 3
        x.view(-1).add_(0)
        return c[:10]  # a view: no new storage

    cpu = torch.device("cpu")
    assert peak_live_bytes(pass_, cpu) == 2 * size
    assert peak_live_bytes(lambda: [x * k for k in range(4)], cpu) == 4 * size  # all four alive together
    assert peak_live_bytes(lambda: x.t().contiguous().view(-1)[:5], cpu) == size


def test_saved_bytes_counts_what_autograd_keeps():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    assert saved_bytes(lambda: (x @ w).sum()) == x.nbytes  # matmul keeps its non-parameter input
    layer, z = torch.nn.Linear(8, 8), torch.randn(4, 8, requires_grad=True)
    assert saved_bytes(lambda: layer(z).sum()) == z.nbytes + layer.weight.nbytes  # both kept for the backward
    assert saved_bytes(lambda: layer(z).sum(), held=layer) == z.nbytes  # the weight is in memory anyway
    with torch.no_grad():
        assert saved_bytes(lambda: (x @ w).sum()) == 0


def test_join_plan_matches_the_scheduler_counts():
    grids = [unique_grid(t, 10) for t in (300, 5, 0, 150)]
    plan = join_plan(grids)
    assert sum(len(rows) for rows, _, _ in plan) == sum(min(10, t) for t in (300, 5, 0, 150))
    assert len(plan) == 10 and plan[0][0] == [0, 3, 1]  # longest chains first, t = 0 never runs
    assert [len(r) for r, _, _ in join_plan(grids, width=2)] == [2] * 10 + [1] * 5  # 25 evaluations


def test_plan_end_to_end_on_tiny_models(tiny_unet, tiny_classifier, images):
    reference = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cal = Calibration.fit(score_norm(tiny_unet, VPSchedule(), reference, SampleNoise.from_ids(5, range(8)), 3))
    model = Defense(tiny_classifier, DiffPure(tiny_unet, t_star=20, steps=4, checkpoint=True),
                    SSNI(tiny_unet, make_reweight("sigmoid", cal), n_levels=3)).eval()
    score, reverse = steps_per_sample(model, images)
    assert score == 3 and 0 < reverse <= 4
    cfg = ExperimentConfig(attacks=(AttackConfig(steps=2, eot=2),))
    y = torch.zeros(len(images), dtype=torch.long)
    p = make_plan(cfg, model, images, y, n=10, world=2, repeats=1)
    assert p["per_shard"] == 5 and p["batch"] == 5 and p["seconds"] > 0 and p["peak_bytes"] > 0
    assert p["max_batch"] >= 1 and "predicted wall time" in format_plan(p)
    # the inference score-norm pass (3 levels x 5 rows in one call) is counted beside the attack's bytes
    assert p["inference_rows_per_call"] == 15
    assert p["inference_bytes"] == 15 * p["units"]["step_live_bytes"] > 0
    assert p["peak_bytes"] >= p["baseline_bytes"] + p["inference_bytes"]
    capped = make_plan(replace(cfg, evaluate=replace(cfg.evaluate, max_rows=4)), model, images, y, n=10, repeats=1)
    assert capped["inference_rows_per_call"] == 4 and model.max_rows is None  # the probe's cap is undone


def test_inference_memory_bounds_the_batch_unless_max_rows_caps_the_call():
    # 20 levels, 1 GiB per row at the peak, 100 GiB usable: 100 rows fit, so 5 samples per call
    gib = 2 ** 30
    free, batch_fit = _inference_memory(20, 16, None, gib, 100 * gib)
    assert free["inference_rows_per_call"] == 320 and not free["inference_fits"] and batch_fit == 5
    capped, batch_fit = _inference_memory(20, 16, 64, gib, 100 * gib)
    assert capped["inference_rows_per_call"] == 64 and capped["inference_fits"] and batch_fit >= 16
    assert capped["max_rows_fit"] == 100


def test_plan_measures_at_fewer_rows_when_the_batch_runs_out_of_memory(tiny_unet, tiny_classifier, images,
                                                                       monkeypatch):
    import ssni.evaluate.plan as plan

    measured = plan.measure_units

    def fits_two_rows(model, x, rows, grad_rows, repeats=3):
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return measured(model, x, rows, grad_rows, repeats)

    monkeypatch.setattr(plan, "measure_units", fits_two_rows)
    model = Defense(tiny_classifier, DiffPure(tiny_unet, t_star=20, steps=4)).eval()
    p = make_plan(ExperimentConfig(attacks=(AttackConfig(steps=1, eot=1),)), model, images, None, n=5, repeats=1)
    assert p["batch"] == 5 and p["measured_rows"] == 2 and p["seconds"] > 0
    assert "out of device memory at batch 5: units measured at 2 rows" in format_plan(p)


def test_the_plan_counts_the_adaptive_attacks_network_rows(tiny_config_file, tiny_weights):
    """The adaptive attack adds restoration passes, an APGD run and a held-out choice to its iterations;
    the plan counted its iterations only (about 4x too little). With a unit of 1 per network row, the
    cost model's count is the number of rows the network sees (PGD, the same count, as the control)."""
    import pytest

    from ssni.evaluate import load_config
    from ssni.evaluate.build import build_attack, load_eval_data
    from ssni.evaluate.costs import attack_cost, steps_per_sample
    from ssni.evaluate.runner import prepare_model
    from ssni.evaluate.units import Units

    ones = Units(step=1, step_grad=1, step_ck=2, classifier=0, classifier_grad=0, step_saved_bytes=0,
                 step_input_bytes=0, classifier_saved_bytes=0, weight_bytes=0)
    counted = {}
    for name in ("pgd", "adaptive"):
        cfg = load_config(tiny_config_file, {"attacks.0.name": name, "attacks.0.steps": 6, "attacks.0.eot": 2,
                                             "data.n": 4, "purifier.checkpoint": False})
        model = prepare_model(cfg, tiny_weights)
        data = load_eval_data(cfg)
        score, reverse = steps_per_sample(model, data.images)
        attack, _ = build_attack(cfg.attacks[0], model, cfg.evaluate.seed)
        rows = []
        hook = model.purifier.model.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
        attack(model, data.images, data.labels, data.ids)
        hook.remove()
        counted[name] = sum(rows) / len(data)
        assert counted[name] == pytest.approx(attack_cost(cfg.attacks[0], ones, score, reverse, 1, False), rel=0.1)
    assert counted["adaptive"] > 3.5 * counted["pgd"]
