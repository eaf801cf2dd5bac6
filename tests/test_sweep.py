import json
import re

import pytest
from typer.testing import CliRunner

from conftest import TINY_EXPERIMENT
from ssni.cli import app
from ssni.errors import ConfigError
from ssni.evaluate import runner as runner_module
from ssni.frontier import compare, frontier_verdict, neighbours
from ssni.metrics import mcnemar_exact
from ssni.sweep import parse_grid, plan_sweep, run_sweep, sweep_points

TINY = TINY_EXPERIMENT.replace("n = 2", "n = 4")  # two batches of 2 per point: a kill can land inside one
BASE = TINY.replace('reweight = "sigmoid"', 'reweight = "none"')  # DiffPure alone
UNDEFENDED = TINY.replace('method = "diffpure"\nt_star = 20\nsteps = 2', 'method = "none"')


@pytest.fixture
def two_configs(write_toml):
    return [write_toml(BASE, "diffpure.toml"), write_toml(TINY, "ssni-n.toml")]


def test_a_killed_sweep_resumes_to_the_same_sweep_json(tmp_path, two_configs, tiny_weights, monkeypatch):
    points = sweep_points(two_configs, parse_grid(["purifier.diffpure.t_star=10,20"]))
    assert [p.folder for p in points] == ["diffpure/purifier.diffpure.t_star=10", "diffpure/purifier.diffpure.t_star=20",
                                          "ssni-n/purifier.diffpure.t_star=10", "ssni-n/purifier.diffpure.t_star=20"]
    assert [p.label for p in points] == ["DiffPure"] * 2 + ["DiffPure + SSNI-N"] * 2
    run_sweep(points, tmp_path / "full", tiny_weights, progress=False)
    real_run_batch, calls = runner_module.run_batch, []

    def crash_in_second_point(*args):
        calls.append(1)
        if len(calls) == 4:  # point 1: batches 1-2; point 2: batch 3 committed, batch 4 killed
            raise KeyboardInterrupt
        return real_run_batch(*args)

    monkeypatch.setattr(runner_module, "run_batch", crash_in_second_point)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(points, tmp_path / "resumed", tiny_weights, progress=False)
    partial = json.loads((tmp_path / "resumed" / "sweep.json").read_text())  # written after the first point
    assert [p["n"] for p in partial["points"]] == [4, 0, 0, 0]
    calls.clear()
    monkeypatch.setattr(runner_module, "run_batch", lambda *a: (calls.append(1), real_run_batch(*a))[1])
    run_sweep(points, tmp_path / "resumed", tiny_weights, progress=False)
    assert len(calls) == 1 + 2 + 2  # the rest of point 2, then points 3 and 4; point 1 is not run again
    full, resumed = ((tmp_path / d / "sweep.json").read_text() for d in ("full", "resumed"))
    assert resumed == full
    result = json.loads(full)
    assert all(p["complete"] and p["n"] == 4 for p in result["points"])
    assert set(result["points"][0]["robust"]) == {"single", "majority", "worst", "any_iterate"}
    assert result["points"][2]["t_mean"] <= 10 < result["points"][3]["t_mean"] + 10  # SSNI's levels follow its T
    for name in ("table.md", "frontier.png", "paired.md", "paired.json", "times.json"):
        assert (tmp_path / "resumed" / name).is_file(), name
    assert not (tmp_path / "resumed" / "robust_vs_eps.png").exists()  # eps is not swept
    paired = json.loads((tmp_path / "resumed" / "paired.json").read_text())
    assert [e["folder"] for e in paired] == [p.folder for p in points[2:]]
    assert all(c["n"] == 4 and c["against"].startswith("diffpure/") for e in paired for c in e["comparisons"])


def test_an_axis_reaches_only_the_configs_that_have_its_key(write_toml):
    configs = [write_toml(BASE, "base.toml"), write_toml(TINY, "n.toml"), write_toml(UNDEFENDED, "none.toml")]
    grid = ["purifier.diffpure.t_star=10,20", "ssni.bias=3,5", "attacks.0.eps=0.1,0.2"]
    points = sweep_points(configs, parse_grid(grid))
    by_stem = {s: [dict(p.values) for p in points if p.stem == s] for s in ("base", "n", "none")}
    assert len(by_stem["base"]) == 4 and all("ssni.bias" not in v for v in by_stem["base"])  # SSNI off
    assert len(by_stem["n"]) == 8
    assert by_stem["none"] == [{"attacks.0.eps": 0.1}, {"attacks.0.eps": 0.2}]  # no purifier, no t_star
    assert {p.cfg.attacks[0].eps for p in points} == {0.1, 0.2}
    scoped = sweep_points(configs[:2], parse_grid(["purifier.diffpure.t_star=10,20,30", "n:purifier.t_star=30"]))
    assert [p.cfg.purifier.settings.t_star for p in scoped] == [10, 20, 30, 30]  # the scoped axis replaces it for n
    assert sweep_points([configs[2]], [])[0].folder == "none/base"
    linked = sweep_points(configs[:1], parse_grid(["attacks.0.eps+attacks.0.step_size=0.1+0.02,0.3+0.05"]))
    assert [(p.cfg.attacks[0].eps, p.cfg.attacks[0].step_size) for p in linked] == [(0.1, 0.02), (0.3, 0.05)]
    assert linked[0].folder == "base/attacks.0.eps=0.1,attacks.0.step_size=0.02"


@pytest.mark.parametrize("grid, message", [
    (["purifier.gdmp.rounds=1,2"], "apply to none of the configs"),
    (["nosuch:attacks.0.eps=0.1"], "name no --config file"),
    (["base:ssni.bias=3,5"], "base has no ssni.bias"),
    (["attacks.0.eps+ssni.bias=0.1+3"], "base has no ssni.bias"),  # linked keys: all or none
    (["attacks.0.eps+attacks.0.step_size=0.1+0.02,0.3"], "key1[+]key2=a1[+]a2"),
    (["purifier.diffpure.t_star=10", "purifier.diffpure.t_star=20"], "given twice"),
    (["t_star"], "section.key=v1,v2"),
])
def test_bad_grids_are_config_errors(write_toml, grid, message):
    configs = [write_toml(BASE, "base.toml"), write_toml(TINY, "n.toml")]
    with pytest.raises(ConfigError, match=message):
        sweep_points(configs, parse_grid(grid))


def test_points_that_differ_only_in_speed_only_keys_are_refused(write_toml):
    with pytest.raises(ConfigError, match="same config hash.*speed-only"):
        sweep_points([write_toml(TINY)], parse_grid(["evaluate.batch_size=1,2"]))
    with pytest.raises(ConfigError, match="same config hash"):
        sweep_points([write_toml(TINY, "a.toml"), write_toml(TINY, "b.toml")], [])
    sweep_points([write_toml(TINY)], parse_grid(["evaluate.seed=1,2"]))  # results differ: allowed


def test_plan_sums_the_points_and_counts_what_is_done(tmp_path, write_toml, tiny_weights, monkeypatch):
    import ssni.evaluate.plan as plan_module

    planned = []

    def fake_plan_run(cfg, weights_dir=None):
        planned.append(cfg.hash())
        return {"seconds": float(cfg.purifier.settings.t_star), "peak_bytes": 2 ** 30 * cfg.data.n}

    points = sweep_points([write_toml(TINY)], parse_grid(["purifier.diffpure.t_star=10,20,30"]))
    run_sweep(points[:1], tmp_path / "s", tiny_weights, progress=False)  # the first point's 4 samples are done
    monkeypatch.setattr(plan_module, "plan_run", fake_plan_run)
    plan = plan_sweep(points, tmp_path / "s", tiny_weights)
    assert planned == [p.cfg.hash() for p in points]
    assert plan["seconds"] == 60.0 and plan["left_seconds"] == 50.0
    assert [r["done"] for r in plan["points"]] == [4, 0, 0] and plan["peak_bytes"] == 4 * 2 ** 30


def test_mcnemar_and_the_frontier_verdict():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)  # all 6 discordant samples one way
    assert mcnemar_exact(3, 3) == 1.0
    a = {i: (True, i < 10) for i in range(20)}  # clean all right, robust on 10
    b = {i: (i < 19, False) for i in range(20)}  # one clean miss, robust none
    c = compare(a, b)
    assert (c["robust"]["a_only"], c["robust"]["b_only"], c["robust"]["better"]) == (10, 0, 1)
    assert (c["clean"]["a_only"], c["clean"]["better"]) == (1, 0)  # one sample: not significant
    assert frontier_verdict([c]) == "above"
    assert frontier_verdict([compare(b, a)]) == "below"
    assert frontier_verdict([c, compare(a, a)]) == "not separable"  # no gain over the other neighbour
    pts = [{"clean": {"acc": x}, "robust": {"worst": {"acc": y}}} for x, y in ((0.9, 0.5), (0.95, 0.3), (0.99, 0.1))]
    assert neighbours({"clean": {"acc": 0.97}}, pts, "worst") == [pts[2], pts[1]]
    assert neighbours({"clean": {"acc": 1.0}}, pts, "worst") == [pts[2]]  # beyond the end: one neighbour


def test_cli_grid_error_is_one_line(write_toml):
    result = CliRunner().invoke(app, ["sweep", "--config", str(write_toml(TINY)), "--grid", "purifier.gns.levels=1",
                                      "--out", "unused"])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)


def test_frontier_curves_join_a_method_along_its_level_within_one_attack():
    from ssni.frontier import _curves, _varying

    def point(label, t, eps):
        return {"label": label, "reweight": "none", "values": {"purifier.diffpure.t_star": t, "attacks.0.eps": eps}}

    points = [point("DiffPure", t, eps) for eps in (0.1, 0.3) for t in (300, 100, 200)] + [point("SSNI", 300, 0.1)]
    assert _varying(points) == ["purifier.diffpure.t_star", "attacks.0.eps"]
    panel = [p for p in points if p["values"]["attacks.0.eps"] == 0.1]
    curves = _curves(panel, {"attacks.0.eps"})
    assert list(curves) == ["DiffPure", "SSNI"]
    assert [p["values"]["purifier.diffpure.t_star"] for p in curves["DiffPure"]] == [100, 200, 300]
    assert len(_curves(points, set())) == 3  # without panels, each eps is its own DiffPure curve


def run_ssni(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``ssni ARGS`` through the console entry point (its error line, exit status and Ctrl-C message)."""
    import sys

    from ssni.cli import main

    monkeypatch.setattr(sys, "argv", ["ssni", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_sweep_claims_its_folder(monkeypatch, capsys, tmp_path, write_toml):
    import ssni.sweep
    from ssni.errors import InputError
    from ssni.folders import claim

    monkeypatch.setattr(ssni.sweep, "run_sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    config = write_toml(TINY)
    (tmp_path / "afile").write_text("x")
    evaluated = claim(tmp_path / "evaluated", "evaluate")
    purified = tmp_path / "purified"  # made by ssni purify before the marker existed
    purified.mkdir()
    (purified / "purify.csv").write_text("file,score_norm,t_star,prediction\n")
    before = sorted(tmp_path.rglob("*"))
    for out, words in ((tmp_path / "afile", "--out .*afile is a file"),
                       (tmp_path / "afile" / "s", "cannot write into .*afile/s: Not a directory"),
                       (evaluated, "evaluated holds the results of `ssni evaluate`.*new --out"),
                       (purified, "purified holds the results of `ssni purify`")):
        status, _, err = run_ssni(monkeypatch, capsys, "sweep", "--config", config, "--out", out)
        assert status == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert re.search(words, err), err
    assert sorted(tmp_path.rglob("*")) == before
    monkeypatch.undo()
    with pytest.raises(InputError, match="`ssni evaluate`"):  # the library call claims it too
        run_sweep(sweep_points([config], []), evaluated)


def test_a_sweep_folder_from_before_the_marker_resumes_and_ctrl_c_counts_its_points(
        monkeypatch, capsys, tmp_path, write_toml, tiny_weights):
    from ssni.folders import OWNER_FILE, owner

    config = write_toml(TINY)
    points = sweep_points([config], parse_grid(["purifier.diffpure.t_star=10,20"]))
    out = tmp_path / "s"
    run_sweep(points[:1], out, tiny_weights, progress=False)
    (out / OWNER_FILE).unlink()  # as an older ssni left it: sweep.json, times.json and a point folder
    assert owner(out) == "sweep" and owner(out / points[0].folder) == "evaluate"
    real_run_batch, calls = runner_module.run_batch, []

    def interrupt(*args):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "run_batch", interrupt)
    args = ["sweep", "--config", config, "--grid", "purifier.diffpure.t_star=10,20", "--out", out,
            "--weights-dir", tiny_weights, "--no-progress"]
    status, _, err = run_ssni(monkeypatch, capsys, *args)
    assert status == 130 and len(calls) == 1  # the finished point was not run again
    assert err.strip().splitlines()[-1] == (f"interrupted: 1 of 2 point(s) are complete under {out} (listed in "
                                            f"{out / 'sweep.json'}); run the same command again to resume")
    assert (out / OWNER_FILE).read_text() == "sweep\n"
    monkeypatch.setattr(runner_module, "run_batch", real_run_batch)
    status, stdout, _ = run_ssni(monkeypatch, capsys, *args)
    assert status in (0, None) and f"wrote {out / 'sweep.json'}" in stdout
    assert [p["n"] for p in json.loads((out / "sweep.json").read_text())["points"]] == [4, 4]
    status, stdout, _ = run_ssni(monkeypatch, capsys, "report", out / points[1].folder)  # a point is evaluate's
    assert status in (0, None) and "clean" in stdout


def test_sweep_announces_the_device_and_precision_of_its_points(monkeypatch, capsys, write_toml):
    import ssni.evaluate.plan as plan_module

    monkeypatch.setattr(plan_module, "plan_run", lambda cfg, weights_dir=None: {"seconds": 1.0, "peak_bytes": 0})
    configs = [write_toml(TINY, "a.toml"), write_toml(TINY + 'precision = "bf16"\n', "b.toml"),
               write_toml(TINY.replace("[evaluate]", '[evaluate]\ndevice = "cpu"\nseed = 5'), "c.toml")]
    status, stdout, _ = run_ssni(monkeypatch, capsys, "sweep", *(x for c in configs for x in ("--config", c)),
                                 "--out", "unused", "--plan")
    lines = stdout.splitlines()
    assert status in (0, None) and lines[0].startswith("device: cpu (") and lines[1].startswith("device: cpu (")
    assert lines[0].endswith("; precision fp32 (2 of 3 points)")  # auto is cpu here: one line with c.toml's
    assert lines[1].endswith("; precision bf16 (1 of 3 points)") and lines[2].startswith("plan: 3 point(s)")
