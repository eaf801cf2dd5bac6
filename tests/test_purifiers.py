import math

import pytest
import torch

from ssni.denoisers import CountingModel
from ssni.diffusion import VPSchedule
from ssni.errors import ConfigError, InputError
from ssni.purifiers import GDMP, GNS, DiffPure
from ssni.purifiers.base import shifted_grid
from ssni.purifiers.schedule import common_grid, unique_grid
from ssni.purifiers.sde import sde_step

from conftest import OracleGaussian, noise_for


KINDS = ["diffpure", "sde", "gdmp", "gdmp-compat", "gns"]


def make(kind, model, **kw):
    if kind == "diffpure":
        return DiffPure(model, t_star=12, steps=kw.pop("steps", 6), **kw)
    if kind == "sde":
        return DiffPure(model, t_star=12, steps=kw.pop("steps", 6), solver="sde", **kw)
    if kind == "gdmp-compat":
        return GDMP(model, t_star=5, rounds=2, reference_compat=True, **kw)
    if kind == "gdmp":
        return GDMP(model, t_star=5, rounds=2, **kw)
    return GNS(model, levels=(4, 7), steps=kw.pop("steps", 5), **kw)


def test_grids_follow_the_authors_construction():
    assert common_grid(10, 5) == [10, 8, 6, 4, 2, 0]
    assert common_grid(3, 5) == [3, 3, 2, 2, 1, 0]  # ceil(k * 3 / 5), k = 5..1
    assert unique_grid(3, 5) == [3, 2, 1, 0]
    assert common_grid(4, None) == [4, 3, 2, 1, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_level_returns_the_input_exactly(kind, tiny_unet, images):
    out = make(kind, tiny_unet).purify(images, torch.zeros(5, dtype=torch.long), noise_for(range(5)))
    assert torch.equal(out, images)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_alone_equals_sample_in_mixed_batch(kind, tiny_unet, images):
    purifier = make(kind, tiny_unet)
    levels = purifier.default_levels(5) * torch.tensor([0, 1, 2, 1, 1])[None] // 2 + 1
    ids = torch.tensor([10, 11, 12, 13, 14])
    batch = purifier.purify(images, levels, noise_for(ids))
    for i in (1, 2, 4):
        alone = purifier.purify(images[i:i + 1], levels[:, i:i + 1], noise_for(ids[i:i + 1]))
        assert torch.allclose(alone[0], batch[i], atol=1e-5)
    reordered = purifier.purify(images.flip(0), levels.flip(1), noise_for(ids.flip(0)))
    assert torch.allclose(reordered.flip(0), batch, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_join_when_due_equals_common_length_with_fewer_evaluations(kind, tiny_unet, images):
    counter = CountingModel(tiny_unet)
    levels = torch.tensor([0, 2, 5, 9, 12])
    fast = make(kind, counter, scheduler="join")
    out = fast.purify(images, levels, noise_for(range(5)))
    join_evals = counter.evaluations
    counter.reset()
    ref = make(kind, counter, scheduler="common").purify(images, levels, noise_for(range(5)))
    assert torch.allclose(out, ref, atol=1e-5)
    n = fast.steps
    per_round = sum(min(n, t) if n is not None else t for t in levels.tolist())
    assert join_evals == per_round * len(fast.t_stars)
    assert counter.evaluations > join_evals


def test_diffpure_counts_sum_of_min_n_t(tiny_unet, images):
    counter = CountingModel(tiny_unet)
    levels = torch.tensor([3, 40, 100, 7, 0])
    DiffPure(counter, t_star=100, steps=20).purify(images, levels, noise_for(range(5)))
    assert counter.evaluations == 3 + 20 + 20 + 7 + 0
    assert counter.calls == 20


@pytest.mark.parametrize("kind", KINDS)
def test_continuous_batching_keeps_calls_within_width_and_changes_no_result(kind, tiny_unet, images):
    counter = CountingModel(tiny_unet)
    purifier = make(kind, counter)
    levels = torch.tensor([0, 2, 5, 9, 12])
    whole = purifier.purify(images, levels, noise_for(range(5)))
    evaluations, calls = counter.evaluations, counter.calls
    counter.reset()
    sizes = []
    counter.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    narrow = purifier.purify(images, levels, noise_for(range(5)), width=2)
    assert torch.allclose(narrow, whole, atol=1e-5)
    assert counter.evaluations == evaluations and max(sizes) == 2 and counter.calls > calls


def test_continuous_batching_fills_freed_rows_longest_chain_first(tiny_unet, images):
    counter = CountingModel(tiny_unet)
    DiffPure(counter, t_star=100, steps=20).purify(images, torch.tensor([3, 40, 100, 7, 0]),
                                                   noise_for(range(5)), width=2)
    # chains 20, 20 run side by side (20 calls), then 7 and 3 (7 calls): 50 evaluations in 27 calls
    assert (counter.evaluations, counter.calls) == (50, 27)
    with pytest.raises(InputError, match="join"):
        DiffPure(counter, scheduler="common").purify(images, None, noise_for(range(5)), width=2)


def test_same_seed_same_output_new_draw_new_output(tiny_unet, images):
    p = DiffPure(tiny_unet, t_star=30, steps=5)
    a = p.purify(images, None, noise_for(range(5), draw=0))
    b = p.purify(images, None, noise_for(range(5), draw=0))
    c = p.purify(images, None, noise_for(range(5), draw=1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_ddim_unit_steps_recover_oracle_data_scale(oracle):
    """With the exact Gaussian denoiser, DDPM from pure noise lands near the data variance."""
    p = DiffPure(oracle, t_star=1000, steps=100, clip_x0=False)
    x = torch.full((64, 1, 8, 8), 0.5)
    out = p.purify(x, None, noise_for(range(64)))
    std = (2 * out - 1).std().item()  # in model scale, x0 ~ N(0, 0.5^2), clipped to [-1, 1]
    assert 0.4 < std < 0.6


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_gradient_equals_plain_gradient(kind, tiny_unet, images):
    grads = []
    for use_checkpoint in (False, True):
        x = images.clone().requires_grad_(True)
        make(kind, tiny_unet, checkpoint=use_checkpoint).purify(x, None, noise_for(range(5))).sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("bad", [torch.rand(2, 1, 28, 28) * 2, torch.full((2, 1, 28, 28), float("nan")),
                                 torch.rand(1, 28, 28), torch.rand(0, 1, 28, 28)])
def test_bad_images_raise(bad, tiny_unet):
    with pytest.raises(InputError):
        DiffPure(tiny_unet, t_star=5, steps=2).purify(bad, None, noise_for(range(len(bad))))


def test_bad_levels_raise(tiny_unet, images):
    p = DiffPure(tiny_unet, t_star=5, steps=2)
    for bad in (torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4, 2000]), torch.ones(3, 5, dtype=torch.long)):
        with pytest.raises(InputError):
            p.purify(images, bad, noise_for(range(5)))


def test_clip_x0_defaults_follow_each_reference(tiny_unet):
    assert not DiffPure(tiny_unet).clip_x0 and not GNS(tiny_unet).clip_x0 and GDMP(tiny_unet).clip_x0


def test_clipped_step_mean_is_the_posterior_mean_of_the_clipped_x0(oracle):
    """With clipping, the eta=1 step's mean is q(x_c | x_a, clip(x0_hat))'s mean (guided-diffusion, GDMP)."""
    p = DiffPure(oracle, clip_x0=True)
    gen = torch.Generator().manual_seed(0)
    x_a, a, c = 3 * torch.randn(4, 1, 4, 4, generator=gen), torch.tensor([50, 50, 9, 9]), torch.tensor([49, 40, 8, 0])
    mean = p.denoise_step(x_a, a, c, torch.zeros_like(x_a), 1.0)[0].double()
    abar_a, abar_c = (p.schedule.abar_table[v].reshape(-1, 1, 1, 1) for v in (a, c))
    eps = oracle(x_a, a).double()
    x0 = ((x_a - (1 - abar_a).sqrt() * eps) / abar_a.sqrt()).clamp(-1, 1)
    coef1 = abar_c.sqrt() * (1 - abar_a / abar_c) / (1 - abar_a)
    coef2 = (abar_a / abar_c).sqrt() * (1 - abar_c) / (1 - abar_a)
    assert torch.allclose(mean, coef1 * x0 + coef2 * x_a, rtol=1e-5, atol=1e-5)


class RecordingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.levels = model, []

    def forward(self, x, t):
        self.levels.append(t.tolist())
        return self.model(x, t)


def test_start_above_t_shifts_the_grid_then_jumps_to_zero(oracle, images):
    """SSNI-L's reference grid at t = 20, b = 5, unit steps: 25, 24, ..., 6, then 0."""
    model = RecordingModel(oracle)
    t = torch.tensor([20])
    DiffPure(model, t_star=20, steps=20).purify(images[:1], t, noise_for([0]), start=t + 5)
    assert [lv[0] for lv in model.levels] == list(range(25, 5, -1))
    assert shifted_grid([20, 10, 0], 5) == [25, 15, 0] and shifted_grid([0], 5) == [0]


def test_gdmp_guides_every_round_toward_the_original_input(tiny_unet, images):
    targets = []

    class Spy(GDMP):
        def reverse_step(self, x_a, a, c, idx, *, noise, round_, x_orig):
            targets.append(x_orig[idx])
            return super().reverse_step(x_a, a, c, idx, noise=noise, round_=round_, x_orig=x_orig)

    Spy(tiny_unet, t_star=3, rounds=3).purify(images, None, noise_for(range(5)))
    assert len(targets) == 9 and all(torch.equal(y, 2 * images - 1) for y in targets)


def test_gdmp_strength_equals_the_reference_batch_mean_per_image():
    """Per-sample pull at scale G, batch B == the reference's batch-mean MSE pull (B images)."""
    gdmp = GDMP(OracleGaussian(), guide_scale=60000.0, guide_batch=100)
    like = torch.zeros(1, 3, 32, 32)
    abar = gdmp.schedule.abar_table[36].item()
    m_ref = (8 * 2 / 255) / 3 / 60000.0
    reference = (1 - abar) ** 0.5 / (m_ref * abar**0.5) * 2 / (100 * 3 * 32 * 32)
    assert gdmp.guide_pull(torch.tensor([36]), like).item() == pytest.approx(reference, rel=1e-5)


def test_gdmp_reference_compat_jumps_one_level_above_and_steps_with_beta(oracle):
    gdmp = GDMP(oracle, t_star=36, reference_compat=True)
    assert gdmp.jump_levels(torch.tensor([36, 0])).tolist() == [37, 0]
    like = torch.zeros(2, 1, 2, 2)
    var, var_guide = gdmp.reference_variances(torch.tensor([36, 1]), torch.tensor([35, 0]), like)
    beta = gdmp.schedule.betas
    assert var[0].flatten()[0].item() == pytest.approx(beta[36].item(), rel=1e-4) and var[1].abs().max() == 0
    assert var_guide[1].flatten()[0].item() == pytest.approx(beta[2].item() * (1 - gdmp.schedule.abar_table[1].item())
                                                             / (1 - gdmp.schedule.abar_table[2].item()), rel=1e-4)


def test_sde_solver_recovers_oracle_data_scale(oracle):
    """Reverse VP-SDE from pure noise with the exact Gaussian score lands at the data variance."""
    p = DiffPure(oracle, t_star=1000, steps=None, solver="sde")
    out = p.purify(torch.full((64, 1, 8, 8), 0.5), None, noise_for(range(64)))
    assert 0.45 < (2 * out - 1).std().item() < 0.55  # x0 ~ N(0, 0.5^2); image clamp is far out


def test_sde_step_is_euler_maruyama_of_the_reverse_vp_sde(oracle):
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    a, c = torch.tensor([100, 1]), torch.tensor([99, 0])
    out = sde_step(oracle, VPSchedule(), x, a, c, z)
    for i, (s, dt) in enumerate([(0.1, 1e-3), (1e-3, 1e-3 - 1e-5)]):
        beta = 0.1 + s * 19.9
        std = (1 - math.exp(-0.5 * 19.9 * s**2 - 0.1 * s)) ** 0.5
        score = -oracle(x[i:i + 1], a[i:i + 1]) / std
        expect = x[i] + dt * (0.5 * beta * x[i] + beta * score[0]) + (beta * dt) ** 0.5 * z[i]
        assert torch.allclose(out[i], expect, rtol=1e-5, atol=1e-6)


def test_gdmp_refuses_the_sde_solver_and_unknown_solvers_are_refused(tiny_unet):
    with pytest.raises(ConfigError, match="ddpm"):
        GDMP(tiny_unet, solver="sde")
    with pytest.raises(ConfigError, match="sde"):
        DiffPure(tiny_unet, solver="euler")
