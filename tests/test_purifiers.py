import pytest
import torch

from ssni.denoisers import CountingModel
from ssni.errors import InputError
from ssni.purifiers import GDMP, GNS, DiffPure
from ssni.purifiers.schedule import common_grid, unique_grid

from conftest import noise_for


def make(kind, model, **kw):
    if kind == "diffpure":
        return DiffPure(model, t_star=12, steps=kw.pop("steps", 6), **kw)
    if kind == "gdmp":
        return GDMP(model, t_star=5, rounds=2, **kw)
    return GNS(model, levels=(4, 7), steps=kw.pop("steps", 5), **kw)


def test_grids_follow_the_authors_construction():
    assert common_grid(10, 5) == [10, 8, 6, 4, 2, 0]
    assert common_grid(3, 5) == [3, 3, 2, 2, 1, 0]  # ceil(k * 3 / 5), k = 5..1
    assert unique_grid(3, 5) == [3, 2, 1, 0]
    assert common_grid(4, None) == [4, 3, 2, 1, 0]


def test_zero_level_returns_the_input_exactly(tiny_unet, images):
    out = DiffPure(tiny_unet, t_star=10, steps=5).purify(images, torch.zeros(5, dtype=torch.long),
                                                         noise_for(range(5)))
    assert torch.equal(out, images)


@pytest.mark.parametrize("kind", ["diffpure", "gdmp", "gns"])
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


@pytest.mark.parametrize("kind", ["diffpure", "gdmp", "gns"])
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


@pytest.mark.parametrize("kind", ["diffpure", "gdmp", "gns"])
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


@pytest.mark.parametrize("kind", ["diffpure", "gdmp", "gns"])
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
