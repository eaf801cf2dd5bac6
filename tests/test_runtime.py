"""The runtime policy: device resolution, precision modes, out-of-memory retries, host reads, "auto"."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import assert_same_rows

from ssni import DiffPure, SampleNoise
from ssni.denoisers.protocol import EDMAdapter
from ssni.errors import ConfigError, InputError, ResourceError
from ssni.evaluate import load_config
from ssni.evaluate import runner as runner_module
from ssni.evaluate.runner import evaluate
from ssni.evaluate.store import Store
from ssni.runtime import count_host_reads, precision_mode, resolve_device


def test_auto_and_cpu_resolve_here_and_unknown_devices_are_config_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    for bad in ("foo", "cuda:x", "tpu", "mps"):
        with pytest.raises(ConfigError, match="device"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_clear_error():
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match="CUDA is not available on this machine.*--device cpu"):
            resolve_device(name)


def test_cli_device_errors_are_one_line_and_the_first_line_names_the_device(tiny_config_file, tiny_weights,
                                                                             tmp_path):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from ssni.cli import app, main  # noqa: F401  (main maps SSNIError to exit 2)

    bad = subprocess.run([sys.executable, "-m", "ssni.cli", "evaluate", "--config", str(tiny_config_file),
                          "--out", str(tmp_path / "x"), "--device", "foo"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown device 'foo'")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    result = CliRunner().invoke(app, ["evaluate", "--config", str(tiny_config_file), "--out", str(tmp_path / "r"),
                                      "--weights-dir", str(tiny_weights), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("device: cpu (")


def test_precision_modes_set_tf32_and_autocast_and_restore_them():
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    with precision_mode("fp32", torch.device("cpu")):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee" == torch.backends.cuda.matmul.fp32_precision
        assert not torch.is_autocast_enabled("cpu")
    with precision_mode("tf32", torch.device("cpu")):
        assert torch.backends.cudnn.conv.fp32_precision == "tf32" == torch.backends.cuda.matmul.fp32_precision
    with precision_mode("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    with pytest.raises(ConfigError, match="fp16"):
        with precision_mode("fp16", torch.device("cpu")):
            pass


def test_the_run_records_its_precision_and_tf32_changes_nothing_on_a_cpu(tiny_config_file, tiny_weights, tmp_path):
    cfg = load_config(tiny_config_file)
    tf32 = replace(cfg, evaluate=replace(cfg.evaluate, precision="tf32"))
    assert tf32.hash() != cfg.hash()  # precision changes results on a GPU: it is part of the hash
    for name, run in (("fp32", cfg), ("tf32", tf32)):
        evaluate(run, tmp_path / name, tiny_weights, progress=False)
        assert json.loads((tmp_path / name / "config.json").read_text())["evaluate"]["precision"] == name
    a, b = (_rows(tmp_path / n, c) for n, c in (("fp32", cfg), ("tf32", tf32)))
    assert [r["clean_pred"] for r in a] == [r["clean_pred"] for r in b]
    assert [r["score_norm"] for r in a] == [r["score_norm"] for r in b]  # TF32 does not exist on a CPU


def _rows(out, cfg) -> list[dict]:
    store = Store(out / "results.sqlite", cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    found = [{k: v for k, v in r.items() if k != "seconds"} for r in store.rows()]
    store.close()
    return found


def test_a_batch_out_of_memory_is_retried_at_half_the_rows_with_the_same_results(tiny_config_file, tiny_weights,
                                                                                 tmp_path, monkeypatch, capsys):
    cfg = load_config(tiny_config_file, {"data.n": 4, "evaluate.batch_size": 4})
    evaluate(cfg, tmp_path / "plain", tiny_weights, progress=False)
    real, sizes = runner_module.run_batch, []

    def fits_one_row(cfg_, model, attacks, x, y, ids):
        sizes.append(len(ids))
        if len(ids) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 38.00 GiB (simulated)")
        return real(cfg_, model, attacks, x, y, ids)

    monkeypatch.setattr(runner_module, "run_batch", fits_one_row)
    evaluate(cfg, tmp_path / "retried", tiny_weights, progress=False)
    assert sizes == [4, 2, 1, 1, 1, 1]  # halved twice, then the run keeps the batch that fits
    said = capsys.readouterr()
    assert (said.out + said.err).count("out of memory on cpu") == 2
    assert_same_rows(_rows(tmp_path / "plain", cfg), _rows(tmp_path / "retried", cfg))


def test_one_row_that_does_not_fit_is_a_resource_error_naming_what_to_change(tiny_config_file, tiny_weights,
                                                                            tmp_path, monkeypatch):
    def never_fits(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(runner_module, "run_batch", never_fits)
    with pytest.raises(ResourceError, match="one sample does not fit.*--plan"):
        evaluate(load_config(tiny_config_file), tmp_path / "run", tiny_weights, progress=False)


def test_other_runtime_errors_are_not_taken_for_memory(tiny_config_file, tiny_weights, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(runner_module, "run_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate(load_config(tiny_config_file), tmp_path / "run", tiny_weights, progress=False)


def test_auto_settings_are_resolved_recorded_and_change_no_result(tiny_config_file, tiny_weights, tmp_path, capsys):
    cfg = load_config(tiny_config_file, {"data.n": 4})
    auto = load_config(tiny_config_file, {"data.n": 4, "evaluate.batch_size": "auto", "attacks.0.eot_batch": "auto",
                                          "purifier.checkpoint": "auto"})
    assert auto.hash() == cfg.hash()  # speed-only keys
    evaluate(cfg, tmp_path / "fixed", tiny_weights, progress=False)
    evaluate(auto, tmp_path / "auto", tiny_weights, progress=True)
    said = capsys.readouterr()
    assert "auto: batch_size" in said.out + said.err
    speed = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert isinstance(speed["evaluate"]["batch_size"], int) and isinstance(speed["purifier"]["checkpoint"], bool)
    choice = json.loads((tmp_path / "auto" / "speed.json").read_text())
    assert choice["fits"] and choice["widths"] and choice["batch_size"] == speed["evaluate"]["batch_size"]
    assert_same_rows(_rows(tmp_path / "fixed", cfg), _rows(tmp_path / "auto", auto))


def units_cheaper_up_to(widest: int):
    """A stand-in for ``units.measure_units``: per-row costs that fall with the call's width up to
    ``widest`` rows, then stay flat."""
    from ssni.evaluate import units

    def measured(model, x, rows, grad_rows, repeats=2):
        per_row = 1.0 / min(rows, widest)
        return units.Units(step=per_row, step_grad=3 * per_row, step_ck=4 * per_row, classifier=0.1 * per_row,
                           classifier_grad=0.3 * per_row, step_saved_bytes=1.0, step_input_bytes=0.1,
                           classifier_saved_bytes=0.0, weight_bytes=0)
    return measured


def test_auto_picks_the_fastest_candidate_that_fits(monkeypatch, tiny_unet, tiny_classifier, images):
    """With per-row costs that fall until 4 rows and memory for 6 attack rows, the choice is the widest
    call that fits: batch x eot_batch <= 6 and as wide as the saturation allows."""
    from ssni import Defense
    from ssni.evaluate import auto, costs, units
    from ssni.evaluate.config import from_dict

    monkeypatch.setattr(units, "measure_units", units_cheaper_up_to(4))
    monkeypatch.setattr(costs, "free_bytes", lambda device: (6 * 2 * 3 / costs.MEMORY_MARGIN + 1e-9, "test"))
    model = Defense(tiny_classifier, DiffPure(tiny_unet, t_star=2, steps=2)).eval()
    cfg = from_dict({"data": {"n": 8}, "evaluate": {"batch_size": "auto"}, "purifier": {"checkpoint": "auto"},
                     "attacks": [{"eot": 4, "eot_batch": "auto"}]})
    resolved, choice = auto.resolve_auto(cfg, model, images, None)
    # each attack row keeps (0 score + 2 reverse) x 1 byte x ... : without checkpointing 2 bytes per row
    assert choice["fits"] and choice["batch_size"] * choice["eot_batch"]["0:pgd"] >= 4
    assert resolved.evaluate.batch_size == choice["batch_size"]
    assert resolved.attacks[0].eot_batch == choice["eot_batch"]["0:pgd"]
    assert "auto" not in (resolved.evaluate.batch_size, resolved.purifier.checkpoint, resolved.attacks[0].eot_batch)


class _LevelNet(torch.nn.Module):
    """An EDM-style denoiser: the adapter around it checks levels as every published network does."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, sigma):
        return self.conv(x) / (1 + sigma.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("scheduler,solver", [("join", "ddpm"), ("common", "ddpm"), ("join", "sde")])
def test_host_reads_of_a_purification_do_not_grow_with_its_steps(scheduler, solver, images):
    net = EDMAdapter(_LevelNet())
    t = torch.tensor([40, 30, 20, 10, 5])
    counts = []
    for steps in (2, 10):
        purifier = DiffPure(net, t_star=40, steps=steps, scheduler=scheduler, solver=solver)
        with torch.no_grad():
            counts.append(count_host_reads(lambda: purifier.purify(images, t, SampleNoise.from_ids(0, range(5)))))
    assert counts[0] == counts[1] <= 8
    outside = count_host_reads(lambda: net(2 * images - 1, t))  # a direct call still checks its levels
    assert outside >= 1


@pytest.mark.parametrize("checkpoint", [False, True])
def test_host_reads_of_an_attack_step_do_not_grow_with_the_reverse_steps(checkpoint, images):
    from ssni import SSNI, Calibration, Defense, make_reweight
    from ssni.attacks import PGD, ThreatModel
    from ssni.classifiers import SmallCNN, SmallCNNConfig

    net = EDMAdapter(_LevelNet())
    classifier = SmallCNN(SmallCNNConfig(width=4)).eval()
    reweight = make_reweight("sigmoid", Calibration.fit(torch.tensor([1.0, 2.0, 3.0])))
    y = torch.zeros(len(images), dtype=torch.long)
    counts = []
    for steps in (2, 10):
        defense = Defense(classifier, DiffPure(net, t_star=40, steps=steps, checkpoint=checkpoint),
                          SSNI(net, reweight, n_levels=3)).eval()
        attack = PGD(ThreatModel("linf", 0.1), steps=1, eot=1)
        counts.append(count_host_reads(lambda: attack(defense, images, y)))
    assert counts[0] == counts[1]


def test_auto_chooses_each_attacks_eot_batch_and_records_only_its_choices(monkeypatch, tiny_unet, tiny_classifier,
                                                                           images):
    """A set eot_batch belongs to its attack: an "auto" attack beside it gets its own measured choice (it got
    the largest set value, unmeasured), and a set batch_size is the run's, so the choice does not record it
    (it recorded min(batch, per_shard), which the run does not use)."""
    from ssni import Defense
    from ssni.evaluate import auto, costs, units
    from ssni.evaluate.config import from_dict

    monkeypatch.setattr(units, "measure_units", units_cheaper_up_to(8))
    monkeypatch.setattr(costs, "free_bytes", lambda device: (1e12, "test"))
    model = Defense(tiny_classifier, DiffPure(tiny_unet, t_star=2, steps=2)).eval()
    cfg = from_dict({"data": {"n": 4}, "evaluate": {"batch_size": 16},
                     "attacks": [{"eot": 4, "eot_batch": 1}, {"eot": 8, "eot_batch": "auto"}, {"eot": 2}]})
    resolved, choice = auto.resolve_auto(cfg, model, images, None)
    assert [a.eot_batch for a in resolved.attacks] == [1, 2, 1]  # 4 samples x 2 draws: the 8 rows that saturate
    assert choice["eot_batch"] == {"1:pgd": 2} and "batch_size" not in choice and "checkpoint" not in choice
    assert resolved.evaluate.batch_size == 16 and choice["fits"]
    assert auto.format_choice(choice).startswith("auto: 1:pgd eot_batch 2 (fastest of 1 candidates")


def _small_defense(ssni: bool, checkpoint: bool, steps: int = 3):
    from ssni import SSNI, Calibration, Defense, make_reweight
    from ssni.classifiers import SmallCNN, SmallCNNConfig

    torch.manual_seed(0)
    net = EDMAdapter(_LevelNet())
    reweight = make_reweight("sigmoid", Calibration.fit(torch.tensor([1.0, 2.0, 3.0])))
    return Defense(SmallCNN(SmallCNNConfig(width=4)).eval(), DiffPure(net, t_star=40, steps=steps, checkpoint=checkpoint),
                   SSNI(net, reweight, n_levels=3) if ssni else None).eval()


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("ssni", [False, True])
@pytest.mark.parametrize("kind", ["pgd", "apgd"])
def test_host_reads_of_an_attack_do_not_grow_with_its_steps(kind, ssni, checkpoint, images):
    """An attack checks its images once and runs its passes inside ``trusted_images``: the defense and its
    purifier then check shapes only (the purifier's levels come from the defense, valid by construction).
    Without SSNI no pass reads anything back; with SSNI a pass reads the levels it picked once, for the
    reverse grids (the join scheduler plans its calls on the host). Before: 10 reads per pass (3 + 3
    image checks, 2 level checks, 2 grid reads)."""
    from ssni.attacks import APGD, PGD, ThreatModel

    y = torch.zeros(len(images), dtype=torch.long)
    make, passes = {"pgd": (lambda s: PGD(ThreatModel("linf", 0.1), steps=s, eot=2), 2),  # 2 passes per step
                    "apgd": (lambda s: APGD(ThreatModel("linf", 0.1), steps=s, eot=2, eot_batch=2), 1)}[kind]
    counts = []
    for steps in (2, 6):
        defense = _small_defense(ssni, checkpoint)
        counts.append(count_host_reads(lambda: make(steps)(defense, images, y)))
    assert counts[1] - counts[0] == (6 - 2) * passes * int(ssni)
    assert counts[0] == 2 + (2 + (kind == "apgd")) * passes * int(ssni)  # image check + loss trace, grid reads


@pytest.mark.parametrize("ssni", [False, True])
def test_a_direct_defense_call_checks_its_images_once_and_reads_the_levels_once(ssni, images):
    defense = _small_defense(ssni, checkpoint=False)
    with torch.no_grad():
        assert count_host_reads(lambda: defense(images)) == 1 + int(ssni)  # one image check (+ the grids' levels)
        two_votes = _small_defense(ssni, checkpoint=False)
        two_votes.votes = 2
        assert count_host_reads(lambda: two_votes(images)) == 1 + 2 * int(ssni)  # each vote reads its levels
        with pytest.raises(InputError, match=r"\[0, 1\]"):
            defense(images + 1)


def test_the_read_counter_sees_each_kind_of_read():
    x = torch.arange(4.0)
    mask, rows = x > 1, torch.tensor([0, 2])
    assert count_host_reads(lambda: x.sum().item()) == 1
    assert count_host_reads(lambda: bool((x > 1).any())) == 1
    assert count_host_reads(lambda: x.tolist()) == 1
    assert count_host_reads(lambda: x.numpy()) == 1
    assert count_host_reads(lambda: x * 2 + 1) == 0
    # ops whose output size (or Python result) depends on the values: each one syncs a GPU
    reads = {"nonzero": lambda: mask.nonzero(), "where(mask)": lambda: torch.where(mask),
             "equal": lambda: torch.equal(x, x), "is_nonzero": lambda: torch.is_nonzero(mask[:1]),
             "allclose": lambda: torch.allclose(x, x), "masked_select": lambda: x.masked_select(mask),
             "x[mask]": lambda: x[mask], "x[mask] = 0": lambda: x.clone().__setitem__(mask, 0.0),
             "x[:, mask]": lambda: x.repeat(2, 1)[:, mask], "unique": lambda: x.unique(),
             "repeat_interleave(tensor)": lambda: x.repeat_interleave(torch.tensor([1, 2, 1, 1]))}
    assert {name: count_host_reads(f) for name, f in reads.items()} == {name: 1 for name in reads}
    free = {"where(mask, a, b)": lambda: torch.where(mask, x, -x), "x[rows]": lambda: x[rows],
            "x[rows] = 0": lambda: x.clone().__setitem__(rows, 0.0), "masked_fill": lambda: x.masked_fill(mask, 0),
            "repeat_interleave(int)": lambda: x.repeat_interleave(2), "x[1:]": lambda: x[1:] + x[0]}
    assert {name: count_host_reads(f) for name, f in free.items()} == {name: 0 for name in free}


@pytest.mark.parametrize("restarts", [1, 2])
def test_apgd_reads_nothing_back_per_step(restarts, tiny_classifier, images):
    """The best point, the halved steps and the restarts' choice are selections by torch.where: on a
    plain classifier an APGD run reads back its input check and its loss trace, whatever its steps."""
    from ssni.attacks import APGD, ThreatModel

    y = torch.zeros(len(images), dtype=torch.long)
    counts = [count_host_reads(lambda: APGD(ThreatModel("linf", 0.1), steps=steps, restarts=restarts)(
        tiny_classifier, images, y)) for steps in (3, 9)]
    assert counts[0] == counts[1] == 2  # check_images (one read) and trace_values


def test_score_norms_are_averaged_in_float32_under_bf16_autocast(tiny_unet, images):
    from ssni import VPSchedule, score_norm

    noise = SampleNoise.from_ids(0, range(len(images)))
    with torch.no_grad():
        exact = score_norm(tiny_unet, VPSchedule(), images, noise, 4)
        with precision_mode("bf16", torch.device("cpu")):
            fast = score_norm(tiny_unet, VPSchedule(), images, noise, 4)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0)  # bf16 networks, float32 mean and norm


def test_images_on_another_device_than_the_networks_are_an_input_error(tiny_unet, tiny_classifier):
    from ssni import Defense
    from ssni.errors import InputError

    defense = Defense(tiny_classifier, DiffPure(tiny_unet, t_star=4, steps=2))
    with pytest.raises(InputError, match="images are on meta and the defense's networks on cpu"):
        defense(torch.rand(2, 1, 28, 28, device="meta"))


CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to " \
          "allocate 35184372088832 bytes. Error code 12 (Cannot allocate memory)"


def test_the_cpu_allocators_failure_is_out_of_memory_too():
    from ssni.runtime import is_out_of_memory

    try:
        torch.empty(2 ** 45, dtype=torch.uint8)  # 32 TiB: the CPU allocator refuses it at once
    except RuntimeError as err:
        real = err
    else:  # pragma: no cover  (a machine that hands out 32 TiB)
        pytest.skip("the allocator gave 32 TiB")
    assert not isinstance(real, torch.OutOfMemoryError) and is_out_of_memory(real)
    assert is_out_of_memory(RuntimeError(CPU_OOM)) and is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


def test_a_cpu_out_of_memory_batch_is_retried_like_a_cuda_one(tiny_config_file, tiny_weights, tmp_path, monkeypatch,
                                                              capsys):
    cfg = load_config(tiny_config_file, {"data.n": 4, "evaluate.batch_size": 4})
    real, sizes = runner_module.run_batch, []

    def fits_two_rows(cfg_, model, attacks, x, y, ids):
        sizes.append(len(ids))
        if len(ids) > 2:
            raise RuntimeError(CPU_OOM)
        return real(cfg_, model, attacks, x, y, ids)

    monkeypatch.setattr(runner_module, "run_batch", fits_two_rows)
    evaluate(cfg, tmp_path / "retried", tiny_weights, progress=False)
    assert sizes == [4, 2, 2]
    said = capsys.readouterr()
    assert (said.out + said.err).count("out of memory on cpu at a batch of 4: continuing at 2") == 1


def test_auto_and_the_plan_take_the_cpu_allocators_failure_as_out_of_memory(monkeypatch, tiny_unet, tiny_classifier,
                                                                           images):
    """One predicate and one halving rule: ``"auto"`` keeps the widths that fit, the plan halves its rows, and
    one row that does not fit is a ResourceError in both, never the allocator's traceback."""
    from ssni import Defense
    from ssni.evaluate import auto, plan, units

    def fits(limit):
        def measure(model, x, rows, grad_rows, repeats=2):
            if grad_rows > limit:
                raise RuntimeError(CPU_OOM)
            return units.Units(step=1.0, step_grad=1.0, step_ck=1.0, classifier=0.1, classifier_grad=0.1,
                               step_saved_bytes=1.0, step_input_bytes=0.1, classifier_saved_bytes=0.0, weight_bytes=0)
        return measure

    model = Defense(tiny_classifier, DiffPure(tiny_unet, t_star=2, steps=2)).eval()
    monkeypatch.setattr(units, "measure_units", fits(2))
    assert sorted(auto.measure_widths(model, images, 8)) == [1, 2]
    monkeypatch.setattr(plan, "measure_units", fits(4))
    assert plan._measure_fitting_units(model, images, 8, 2, 1)[1] == 2  # 8 x 2 and 4 x 2 rows did not fit
    for set_fits in (lambda f: monkeypatch.setattr(units, "measure_units", f),
                     lambda f: monkeypatch.setattr(plan, "measure_units", f)):
        set_fits(fits(0))
    with pytest.raises(ResourceError, match="one sample does not fit"):
        auto.measure_widths(model, images, 8)
    with pytest.raises(ResourceError, match="one sample does not fit"):
        plan._measure_fitting_units(model, images, 8, 2, 1)
