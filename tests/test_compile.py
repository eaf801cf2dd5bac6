"""Compiled networks: no graph breaks inside a purification, rows bucketed to a few widths, same results."""

from __future__ import annotations

import pytest
import torch

from ssni import DiffPure, SampleNoise
from ssni.denoisers.guided_diffusion import GuidedDiffusionConfig, GuidedDiffusionEps, GuidedDiffusionUNet
from ssni.denoisers.score_sde import ScoreSDEConfig, ScoreSDEEps, ScoreSDENet
from ssni.diffusion import trusted_levels
from ssni.runtime import BucketedNetwork, bucket_width


def test_bucket_widths_pad_little_and_stay_few():
    widths = [bucket_width(k) for k in range(1, 4097)]
    assert widths[:8] == list(range(1, 9))  # small calls exact
    assert all(w >= k and w < 1.25 * k + 1 for k, w in zip(range(1, 4097), widths))
    assert all(a <= b for a, b in zip(widths, widths[1:]))  # monotone: a wider call never pads to less
    assert len(set(widths)) <= 8 + 4 * 9  # four widths per doubling
    assert {bucket_width(w) for w in set(widths)} == set(widths)  # a bucket width is its own bucket


def test_bucketed_network_gives_the_real_rows_the_same_output_and_gradient(tiny_unet):
    bucketed = BucketedNetwork(tiny_unet)
    gen = torch.Generator().manual_seed(0)
    for rows in (3, 9, 13):
        x = torch.randn(rows, 1, 28, 28, generator=gen, requires_grad=True)
        t = torch.randint(1, 1000, (rows,), generator=gen)
        plain, padded = tiny_unet(x, t), bucketed(x, t)
        assert padded.shape == plain.shape
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
        g_plain, = torch.autograd.grad(plain.square().sum(), x)
        g_padded, = torch.autograd.grad(padded.square().sum(), x)
        torch.testing.assert_close(g_padded, g_plain, rtol=1e-4, atol=1e-6)


def test_a_compiled_network_keeps_the_attributes_the_code_reads(tiny_unet, tiny_classifier):
    """``evaluate.compile`` wraps the networks; a Defense still reads the classifier's trained image size
    through the wrapper (it turned the size check off), and the UNet's config and schedule show through."""
    from ssni import Defense
    from ssni.errors import InputError
    from ssni.runtime import compile_network

    tiny_classifier.image_size = 28  # as load_named sets it from the manifest
    compiled = compile_network(tiny_classifier)  # torch.compile is lazy: nothing compiles here
    assert compiled.image_size == 28 and compiled.config is tiny_classifier.config
    unet = BucketedNetwork(tiny_unet)
    assert unet.config is tiny_unet.config and unet.net is tiny_unet and "net" in dict(unet.named_children())
    with pytest.raises(AttributeError):
        unet.no_such_attribute
    defense = Defense(compiled, DiffPure(tiny_unet, t_star=4, steps=2))
    with pytest.raises(InputError, match="expect 28x28 images, found 32x32"):
        defense(torch.rand(1, 1, 32, 32))


def test_bucketed_network_sees_only_bucket_widths_in_a_mixed_level_purification(tiny_unet, images):
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x, t):
            seen.append(x.shape[0])
            return tiny_unet(x, t)

    t = torch.tensor([30, 17, 9, 4, 1])  # the join scheduler's calls shrink from 5 rows to 1
    noise = SampleNoise.from_ids(0, range(5))
    with torch.no_grad():
        plain = DiffPure(tiny_unet, t_star=30, steps=30).purify(images, t, noise)
        padded = DiffPure(BucketedNetwork(tiny_unet, Recording()), t_star=30, steps=30).purify(images, t, noise)
    assert set(seen) <= {bucket_width(k) for k in range(1, 6)}
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-5)


TINY_GUIDED = GuidedDiffusionConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(8,), num_head_channels=16)
TINY_SDE = ScoreSDEConfig(image_size=16, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


@pytest.mark.parametrize("name", ["unet", "score_sde", "guided_diffusion"])
def test_networks_compile_without_graph_breaks_inside_a_purification(name, tiny_unet):
    torch.manual_seed(0)
    net, shape = {"unet": (tiny_unet, (3, 1, 28, 28)),
                  "score_sde": (ScoreSDEEps(ScoreSDENet(TINY_SDE).eval()), (3, 3, 16, 16)),
                  "guided_diffusion": (GuidedDiffusionEps(GuidedDiffusionUNet(TINY_GUIDED).eval()), (3, 3, 16, 16))}[name]
    x, t = torch.randn(shape), torch.tensor([1, 500, 1000])
    torch._dynamo.reset()
    with trusted_levels(), torch.no_grad():
        inside = torch._dynamo.explain(net)(x, t)
    assert inside.graph_break_count == 0, inside.break_reasons
    if name != "unet":  # outside a purification an adapter checks its levels: one host read, one break
        torch._dynamo.reset()
        with torch.no_grad():
            assert torch._dynamo.explain(net)(x, t).graph_break_count == 1
