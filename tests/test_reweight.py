import math

import pytest
import torch

from ssni.errors import ConfigError, InputError
from ssni.reweight import Calibration, CallableReweight, LinearReweight, SigmoidReweight, make_reweight

CAL = Calibration(mean=10.0, std=2.0, min=2.0, max=22.0, n=100)


def test_sigmoid_matches_hand_computed_levels():
    t, relaxed = SigmoidReweight(CAL).levels(torch.tensor([10.0, 12.0, 4.0, 100.0]), t_star=100)
    # sigmoid((e - 10) / 2) * (99 + 5): 0.5 -> 52, 0.7311 -> 76.03, 0.0474 -> 4.93, 1 -> 104
    assert t.tolist() == [52, 76, 5, 104]
    assert torch.allclose(relaxed, torch.tensor([52.0, 76.032, 4.933, 104.0]), atol=1e-2)


def test_linear_matches_hand_computed_levels_and_clips_to_reference_range():
    t, _ = LinearReweight(CAL).levels(torch.tensor([2.0, 12.2, 22.0, 50.0, 0.0]), t_star=100)
    # (e - 2) / 20 clipped to [0, 1], times 99, plus 5
    assert t.tolist() == [5, 55, 104, 104, 5]


def test_linear_reference_compat_uses_batch_range_and_shifts_reverse_start():
    rw = LinearReweight(CAL, reference_compat=True)
    t, _ = rw.levels(torch.tensor([2.0, 12.2, 50.0, 0.0]), t_star=100)
    # range [min(2, 0), max(22, 50)] = [0, 50]: 0.04, 0.244, 1, 0 -> *99 + 5
    assert t.tolist() == [9, 29, 104, 5]
    start, extra = rw.reverse_plan(t)
    assert start.tolist() == [14, 34, 109, 10] and extra == 0
    # the level of a sample depends on its batch partners only in compat mode
    alone_compat = rw.levels(torch.tensor([12.2]), t_star=100)[0]
    alone_default = LinearReweight(CAL).levels(torch.tensor([12.2]), t_star=100)[0]
    assert alone_compat.item() != 29 and alone_default.item() == 55


def test_sigmoid_reference_compat_adds_bias_reverse_steps():
    t = torch.tensor([10, 20])
    assert SigmoidReweight(CAL).reverse_plan(t)[1] == 0
    assert SigmoidReweight(CAL, reference_compat=True).reverse_plan(t)[1] == 5


@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_levels_are_monotone_and_bounded(kind):
    e = torch.linspace(-50, 80, 2001)
    t, _ = make_reweight(kind, CAL, bias=5).levels(e, t_star=40)
    assert torch.all(t[1:] >= t[:-1])
    assert t.min() >= 1 and t.max() <= 40 - 1 + 5


def test_levels_never_exceed_the_schedule():
    t, _ = SigmoidReweight(CAL, bias=50).levels(torch.tensor([1e3]), t_star=990, max_level=1000)
    assert t.item() == 1000


def test_relaxed_levels_carry_gradient():
    e = torch.tensor([9.0, 11.0], requires_grad=True)
    SigmoidReweight(CAL).levels(e, 100)[1].sum().backward()
    assert torch.all(e.grad > 0)


def test_default_tau_is_reference_std_and_tau_must_be_positive():
    assert SigmoidReweight(CAL).tau == 2.0
    with pytest.raises(ConfigError):
        SigmoidReweight(CAL, tau=0.0)


def test_callable_reweight_plugs_in():
    t, _ = CallableReweight(lambda e, t_star: e * 0 + t_star / 2).levels(torch.tensor([1.0, 2.0]), 30)
    assert t.tolist() == [15, 15]


def test_calibration_fit_save_load_round_trip(tmp_path):
    norms = torch.arange(1.0, 101.0)
    cal = Calibration.fit(norms, n_levels=20, model="x")
    assert cal.mean == pytest.approx(50.5) and cal.min == 1 and cal.max == 100 and cal.n == 100
    assert cal.quantiles["0.5"] == pytest.approx(50.5)
    cal.save(tmp_path / "cal.json")
    assert Calibration.load(tmp_path / "cal.json") == cal


def test_calibration_errors(tmp_path):
    with pytest.raises(InputError):
        Calibration.fit(torch.tensor([1.0]))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError):
        make_reweight("cosine", CAL)


def authors_linear_grid(t: int, n: int, b: int) -> list[int]:
    """The SSNI code's SSNI-L reverse levels (1-based): its 0-based grid ``ceil(k t / n) - 1``
    for ``k = n..1``, shifted by ``b``, then the final jump to level 0."""
    return [math.ceil(k * t / n) + b for k in range(n, 0, -1)] + [0]


@pytest.mark.parametrize("t, n", [(20, 20), (20, 10), (3, 5), (37, 10)])
def test_linear_reference_compat_walks_the_authors_shifted_grid(t, n, oracle):
    """At t = 20, b = 5 the authors walk ..., 8, 7, 6, 0 (not a new grid from 25: ..., 3, 2, 1, 0)."""
    from ssni.purifiers import DiffPure
    from conftest import noise_for

    visited = []

    def recording(x, level):
        visited.append(int(level[0]))
        return oracle(x, level)

    start, extra = LinearReweight(CAL, bias=5, reference_compat=True).reverse_plan(torch.tensor([t]))
    DiffPure(recording, t_star=t, steps=n + extra).purify(torch.full((1, 1, 4, 4), 0.5), torch.tensor([t]),
                                                         noise_for([0]), start=start)
    expected = sorted(set(authors_linear_grid(t, n, 5)), reverse=True)  # repeats are exact no-ops
    assert visited + [0] == expected


def test_a_calibration_file_of_random_bytes_is_a_config_error(tmp_path):
    import pytest

    from ssni.errors import ConfigError
    from ssni.reweight import Calibration

    (tmp_path / "cal.json").write_bytes(bytes([0x94, 0xFF, 0x00, 0x13]) * 16)
    with pytest.raises(ConfigError, match="not a calibration file"):
        Calibration.load(tmp_path / "cal.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a calibration file"):
        Calibration.load(tmp_path / "list.json")
