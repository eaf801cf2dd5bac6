import torch

from ssni.diffusion import VPSchedule
from ssni.score_norm import NOISE_KEY, score_norm, score_norm_nograd

from conftest import noise_for


def closed_form(x, noise, n_levels, s=0.5):
    """The oracle's EPS computed level by level: score = -x_t / (abar s^2 + 1 - abar)."""
    sched, x_model, total = VPSchedule(), 2 * x - 1, 0
    for k in range(1, n_levels + 1):
        abar = sched.abar_table[k].item()
        z = noise.randn((NOISE_KEY, k), x_model)
        x_t = abar**0.5 * x_model + (1 - abar) ** 0.5 * z
        total = total - x_t / (abar * s**2 + 1 - abar)
    return (total / n_levels).flatten(1).norm(dim=1)


def test_oracle_score_norm_matches_closed_form(oracle, images):
    noise = noise_for(range(5))
    e = score_norm(oracle, VPSchedule(), images, noise, n_levels=7)
    assert torch.allclose(e, closed_form(images, noise, 7), rtol=1e-5)


def test_chunked_and_nograd_paths_agree(oracle, images):
    noise = noise_for(range(5))
    full = score_norm(oracle, VPSchedule(), images, noise, n_levels=6)
    chunked = score_norm_nograd(oracle, VPSchedule(), images, noise, n_levels=6, max_rows=4)
    assert torch.allclose(full, chunked, rtol=1e-6)
    assert not chunked.requires_grad


def test_off_manifold_inputs_have_larger_score_norm(oracle):
    """Data ~ N(0, 0.5^2) in model scale: saturated images lie far out, mid-grey near the mode."""
    near = torch.full((4, 1, 16, 16), 0.5)
    far = torch.bernoulli(torch.full((4, 1, 16, 16), 0.5), generator=torch.Generator().manual_seed(0))
    noise = noise_for(range(4))
    assert score_norm(oracle, VPSchedule(), far, noise).min() > score_norm(oracle, VPSchedule(), near, noise).max()


def test_score_norm_is_differentiable_in_input_and_network(oracle, images):
    x = images.clone().requires_grad_(True)
    score_norm(oracle, VPSchedule(), x, noise_for(range(5)), n_levels=3).sum().backward()
    assert x.grad.abs().sum() > 0 and oracle.dummy.grad.abs() > 0


def test_score_norm_of_a_sample_does_not_depend_on_its_batch(tiny_unet, images):
    ids = torch.arange(5)
    batch = score_norm(tiny_unet, VPSchedule(), images, noise_for(ids), n_levels=4)
    alone = score_norm(tiny_unet, VPSchedule(), images[3:4], noise_for(ids[3:4]), n_levels=4)
    assert torch.allclose(batch[3], alone[0], rtol=1e-5)


def test_checkpointed_pass_gives_the_same_value_and_gradient_and_saves_only_inputs(tiny_unet, images):
    """With checkpointing the pass keeps its chunks' inputs (one level's B rows each) for the backward,
    not the network's activations, and recomputes them there: same value, same gradient."""
    from ssni.evaluate.units import saved_bytes

    noise = noise_for(range(5))
    results = {}
    for checkpoint in (False, True):
        x = images.clone().requires_grad_(True)
        e = score_norm(tiny_unet, VPSchedule(), x, noise, n_levels=4, checkpoint=checkpoint)
        e.sum().backward()
        kept = saved_bytes(lambda: score_norm(tiny_unet, VPSchedule(), x, noise, n_levels=4, checkpoint=checkpoint))
        results[checkpoint] = e.detach(), x.grad, kept
    (e_full, g_full, kept_full), (e_ck, g_ck, kept_ck) = results[False], results[True]
    assert torch.allclose(e_full, e_ck, rtol=1e-5)
    assert torch.allclose(g_full, g_ck, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    assert kept_ck * 5 < kept_full
    with torch.no_grad():  # without gradients there is nothing to checkpoint: one call, the same value
        assert torch.allclose(score_norm(tiny_unet, VPSchedule(), images, noise, n_levels=4, checkpoint=True), e_full,
                              rtol=1e-5)
