"""A purifier written outside ssni: its class, its settings dataclass and one registry line run
through ``ssni evaluate`` on the shipped MNIST models, reading its own ``[purifier.<name>]`` table."""

import json
import sys
from dataclasses import dataclass, field

import pytest
from typer.testing import CliRunner

from ssni.checkpoints.registry import default_weights_dir
from ssni.cli import app, main
from ssni.evaluate.config import from_dict
from ssni.evaluate.registries import PURIFIERS, PurifierEntry
from ssni.evaluate.store import Store
from ssni.purifiers import Purifier

CALLS: list[list[list[int]]] = []  # the levels [R][B] of every purify call


@dataclass(frozen=True)
class TwoRoundSettings:
    """``[purifier.two-round]``: the level of each of its two rounds."""

    first: int = field(default=40, metadata={"range": (1, 1000)})
    second: int = field(default=10, metadata={"range": (1, 1000)})


@dataclass
class TwoRound(Purifier):
    """Two DiffPure rounds at its own two levels (a scratch purifier for this test)."""

    first: int = 40
    second: int = 10

    @property
    def t_stars(self) -> tuple[int, ...]:
        return (self.first, self.second)

    def purify(self, x, t, noise, **kw):
        CALLS.append(self._levels(t, x.shape[0]).tolist())
        return super().purify(x, t, noise, **kw)


CONFIG = """
[data]
n = 2
[purifier]
method = "two-round"
steps = 2
[purifier.two-round]
first = 12
[ssni]
reweight = "none"
[[attacks]]
name = "pgd"
steps = 1
eot = 1
[evaluate]
batch_size = 2
rescore_draws = 1
"""


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PURIFIERS, "two-round", PurifierEntry(TwoRoundSettings, TwoRound))  # the one line
    CALLS.clear()


def _evaluate(tmp_path, *extra: str):
    (tmp_path / "exp.toml").write_text(CONFIG)
    return CliRunner().invoke(app, ["evaluate", "--config", str(tmp_path / "exp.toml"), "--out", str(tmp_path / "run"),
                                    "--weights-dir", str(default_weights_dir()), "--no-progress", *extra])


def test_a_new_purifier_runs_through_ssni_evaluate_with_its_own_settings(registered, tmp_path):
    result = _evaluate(tmp_path, "--set", "purifier.two-round.second=5")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["purifier"]["method"] == "two-round" and saved["purifier"]["two-round"] == {"first": 12, "second": 5}
    cfg = from_dict({k: v for k, v in saved.items() if k != "hash"})  # the saved config reads back
    assert cfg.hash() == saved["hash"] and cfg.purifier.settings == TwoRoundSettings(first=12, second=5)
    store = Store(tmp_path / "run" / "results.sqlite", cfg.hash(), json.dumps(cfg.to_dict(), sort_keys=True))
    rows = store.rows()
    store.close()
    assert len({r["sample_id"] for r in rows}) == 2 and all(r["robust"] is not None for r in rows)
    # every purification (clean pass, attack, re-scoring) ran the plugin at its configured levels
    assert CALLS and all(len(lv) == 2 and set(lv[0]) == {12} and set(lv[1]) == {5} for lv in CALLS)


def test_a_new_purifier_s_settings_are_checked_like_the_shipped_ones(registered, tmp_path, monkeypatch, capsys):
    (tmp_path / "exp.toml").write_text(CONFIG)
    for override, message in (("second=0", "error: [purifier.two-round] second = 0: expected an integer in [1, 1000]"),
                              ("t_star=30", "error: [purifier] t_star does not apply to method = 'two-round'")):
        monkeypatch.setattr(sys, "argv", ["ssni", "evaluate", "--config", str(tmp_path / "exp.toml"), "--out",
                                          str(tmp_path / "run"), "--set", f"purifier.{override}"])
        with pytest.raises(SystemExit) as exit_:
            main()  # the console script: one error line, exit 2
        assert exit_.value.code == 2 and capsys.readouterr().err.startswith(message)
    assert not CALLS and not (tmp_path / "run").exists()  # refused before any model loaded
