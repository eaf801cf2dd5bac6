import pytest
import torch

from ssni.diffusion import VPSchedule, forward_jump
from ssni.errors import InputError
from ssni.rng import SampleNoise, derive_seed


def test_abar_starts_at_one_and_decreases():
    abar = VPSchedule().abar_table
    assert abar[0] == 1.0
    assert torch.all(abar[1:] < abar[:-1])
    assert abar[-1] < 1e-4


def test_continuous_twin_tracks_the_discrete_schedule():
    s = VPSchedule()
    t = torch.arange(0, 1001, 50)
    assert torch.allclose(s.abar_continuous(t.double()), s.abar_table[t], atol=2e-3)


def test_sigma_level_round_trip():
    s = VPSchedule()
    t = torch.tensor([1, 7, 100, 500, 999, 1000])
    assert torch.equal(s.level_from_sigma(s.sigma(t)), t)


def test_forward_marginals_match_closed_form_with_per_sample_levels():
    s = VPSchedule()
    t = torch.tensor([0, 10, 100, 400, 900])
    x0 = torch.tensor([0.8, -0.3, 0.5, 1.0, -1.0]).reshape(5, 1, 1, 1).expand(5, 1, 100, 100)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = forward_jump(s, x0, t, eps)
    abar = s.abar(t)
    mean, var = x_t.flatten(1).mean(1), x_t.flatten(1).var(1)
    assert torch.allclose(mean, abar.sqrt() * x0[:, 0, 0, 0], atol=0.03)
    assert torch.allclose(var, 1 - abar, atol=0.03)


def test_relaxed_levels_pass_gradient_but_not_value():
    s = VPSchedule()
    x0, eps = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    t = torch.tensor([50, 60])
    relaxed = t.double().requires_grad_(True)
    out = forward_jump(s, x0, t, eps, relaxed)
    assert torch.equal(out, forward_jump(s, x0, t, eps))
    out.sum().backward()
    assert torch.all(relaxed.grad < 0)  # more noise, less signal


@pytest.mark.parametrize("bad", [torch.tensor([[1, 2]]), torch.tensor([-1, 3]), torch.tensor([1, 1001]),
                                 torch.tensor([1.5, 2.0])])
def test_bad_levels_raise(bad):
    with pytest.raises(InputError):
        VPSchedule().check_levels(bad)


def test_noise_depends_only_on_seed_and_key():
    a = SampleNoise.from_ids(7, [3, 4, 5])
    b = SampleNoise.from_ids(7, [5, 3])
    like = torch.zeros(3, 2, 4)
    full = a.randn(("k", 1), like)
    part = b.randn(("k", 1), like[:2])
    assert torch.equal(full[2], part[0]) and torch.equal(full[0], part[1])
    assert not torch.equal(a.randn(("k", 2), like), full)
    assert derive_seed(1, "x") == derive_seed(1, "x") != derive_seed(1, "y")
