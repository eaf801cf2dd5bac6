"""Re-implemented published networks: checkpoint layouts, loaders and protocol adapters.

Tiny configurations keep these CPU-fast; the full-size layouts are built on the
``meta`` device (no memory) to check parameter counts and key shapes.
"""

import math

import pytest
import torch
from torch import nn

from ssni.denoisers.guided_diffusion import (GuidedDiffusionConfig, GuidedDiffusionEps, GuidedDiffusionUNet,
                                             load_guided_diffusion)
from ssni.denoisers.guided_diffusion import timestep_embedding as guided_embedding
from ssni.denoisers.score_sde import ScoreSDEConfig, ScoreSDEEps, ScoreSDENet, load_score_sde
from ssni.denoisers.score_sde import timestep_embedding as sde_embedding
from ssni.diffusion import VPSchedule
from ssni.errors import CheckpointError, ConfigError, InputError

torch.set_num_threads(1)

TINY_GUIDED = GuidedDiffusionConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(8,), num_head_channels=16)
TINY_SDE = ScoreSDEConfig(image_size=16, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def _perturbed(net: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval()


def _inputs(batch: int = 2, size: int = 16):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(batch, 3, size, size, generator=gen), torch.tensor([1, 1000, 437][:batch])


class Recorder(nn.Module):
    """Stands in for a network: records its conditioning and returns a known output."""

    def __init__(self, out_channels: int = 3):
        super().__init__()
        self.out_channels, self.seen = out_channels, []

    def forward(self, x, cond):
        self.seen.append(cond.clone())
        return torch.cat([x * (k + 1) for k in range(self.out_channels // x.shape[1])], dim=1)


# --- full-size layouts (meta device) ------------------------------------------------------------

def test_guided_diffusion_full_size_matches_the_published_256_uncond_layout():
    with torch.device("meta"):
        net = GuidedDiffusionUNet()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 552_814_086  # x 4 bytes = the 2.21 GB file
    assert len(state) == 566 and len(net.input_blocks) == len(net.output_blocks) == 18
    shapes = {"time_embed.0.weight": (1024, 256), "input_blocks.0.0.weight": (256, 3, 3, 3),
              "input_blocks.1.0.emb_layers.1.weight": (512, 1024),  # scale-shift: 2 x out channels
              "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # residual down block
              "input_blocks.10.1.qkv.weight": (1536, 512, 1),
              "middle_block.1.proj_out.weight": (1024, 1024, 1),
              "output_blocks.2.2.out_layers.3.weight": (1024, 1024, 3, 3),  # residual up block
              "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1), "out.2.weight": (6, 256, 3, 3)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("input_blocks.3.0.skip") for k in state)
    assert net.input_blocks[10][1].heads == 8  # 512 channels / 64 per head


def test_score_sde_full_size_matches_the_ddpmpp_deep_layout():
    with torch.device("meta"):
        net, shallow = ScoreSDENet(), ScoreSDENet(ScoreSDEConfig(num_res_blocks=4))
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 106_632_579  # vp/cifar10_ddpmpp_deep_continuous
    assert sum(p.numel() for p in shallow.parameters()) == 61_804_419  # vp/cifar10_ddpmpp_continuous
    assert len(net.all_modules) == 91 and len(state) == 956
    shapes = {"all_modules.0.weight": (512, 128), "all_modules.1.weight": (512, 512),
              "all_modules.2.weight": (128, 3, 3, 3), "all_modules.3.Dense_0.weight": (128, 512),
              "all_modules.11.Conv_2.weight": (128, 128, 1, 1),  # first down block
              "all_modules.13.NIN_0.W": (256, 256), "all_modules.13.NIN_3.b": (256,),
              "all_modules.89.weight": (128,), "all_modules.90.weight": (3, 128, 3, 3)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    # the reference NCSNpp also has a 'sigmas' buffer (957 state entries, 956 parameters); ours has
    # no buffers, and its parameters() order is the reference's, the order of the EMA shadow list
    assert list(state) == [name for name, _ in net.named_parameters()]


# --- round trips through the published file structures -----------------------------------------

@pytest.mark.parametrize("updown", [True, False])
def test_guided_diffusion_state_dict_round_trip(tmp_path, updown):
    config = GuidedDiffusionConfig(**{**TINY_GUIDED.to_dict(), "resblock_updown": updown})
    torch.manual_seed(0)
    net = _perturbed(GuidedDiffusionUNet(config), 1)
    torch.save(net.state_dict(), tmp_path / "256x256_diffusion_uncond.pt")
    loaded = load_guided_diffusion(tmp_path / "256x256_diffusion_uncond.pt", config)
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t - 1), loaded(x, t - 1))
        assert GuidedDiffusionEps(loaded)(x, t).shape == (2, 3, 16, 16)


def _sde_checkpoint(path, config=TINY_SDE, shadow_transform=lambda ps: ps):
    """A file in run_lib's layout: ``model`` = DataParallel state dict whose first entry is the
    reference's ``sigmas`` buffer; ``ema.shadow_params`` = one tensor per parameter."""
    torch.manual_seed(0)
    raw = _perturbed(ScoreSDENet(config), 2)
    ema = _perturbed(ScoreSDENet(config), 3)
    optimizer = torch.optim.Adam(raw.parameters())
    shadow = [p.detach().clone() for p in ema.parameters()]
    sigmas = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), 1000))
    model = {"module.sigmas": sigmas, **{f"module.{k}": v for k, v in raw.state_dict().items()}}
    torch.save({"model": model,
                "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow_transform(shadow)},
                "optimizer": optimizer.state_dict(), "step": 8}, path)
    return raw, ema


def test_score_sde_checkpoint_round_trip_takes_ema_by_default(tmp_path):
    raw, ema = _sde_checkpoint(tmp_path / "checkpoint_8.pth")
    x, _ = _inputs()
    labels = torch.tensor([0.5, 998.0])
    with torch.no_grad():
        assert torch.equal(load_score_sde(tmp_path / "checkpoint_8.pth", TINY_SDE)(x, labels), ema(x, labels))
        from_model = load_score_sde(tmp_path / "checkpoint_8.pth", TINY_SDE, weights="model")
        assert torch.equal(from_model(x, labels), raw(x, labels))


@pytest.mark.parametrize("with_sigmas", [False, True])
def test_score_sde_plain_state_dict_is_accepted(tmp_path, with_sigmas):
    torch.manual_seed(0)
    net = _perturbed(ScoreSDENet(TINY_SDE), 4)
    state = {"module.sigmas": torch.ones(1000), **{f"module.{k}": v for k, v in net.state_dict().items()}} \
        if with_sigmas else net.state_dict()
    torch.save(state, tmp_path / "plain.pt")
    x, _ = _inputs()
    with torch.no_grad():
        labels = torch.tensor([3.0, 700.0])
        assert torch.equal(load_score_sde(tmp_path / "plain.pt", TINY_SDE)(x, labels), net(x, labels))


def test_score_sde_forward_uses_every_module_once():
    net = ScoreSDENet(TINY_SDE).eval()
    calls = []
    for i, module in enumerate(net.all_modules):
        module.register_forward_hook(lambda *_, i=i: calls.append(i))
    net(*_inputs()[:1], torch.tensor([1.0, 2.0]))
    assert calls == list(range(len(net.all_modules)))


# --- adapters: timestep and label conventions ---------------------------------------------------

def test_guided_adapter_feeds_zero_based_steps_and_returns_epsilon_channels():
    inner = Recorder(out_channels=6)
    x, t = _inputs(3)
    eps = GuidedDiffusionEps(inner)(x, t)
    assert torch.equal(inner.seen[0], t - 1) and torch.equal(eps, x)  # channels 3:6 (2x) are dropped
    with pytest.raises(InputError):
        GuidedDiffusionEps(inner)(x, torch.tensor([0, 5, 9]))


def test_score_sde_adapter_conditions_on_999_times_continuous_time():
    inner = Recorder()
    x, t = _inputs(3)
    eps = ScoreSDEEps(inner)(x, t)
    assert torch.allclose(inner.seen[0], 999.0 * t.float() / 1000.0) and torch.equal(eps, x)
    matched = ScoreSDEEps(inner, time="matched").continuous_time(torch.arange(1, 997))
    schedule = VPSchedule()
    assert torch.allclose(schedule.abar_continuous(1000 * matched.double()).float(),
                          schedule.abar(torch.arange(1, 997)), rtol=1e-4)
    with pytest.raises(ConfigError):
        ScoreSDEEps(ScoreSDENet(ScoreSDEConfig(**{**TINY_SDE.to_dict(), "centered": False})))
    with pytest.raises(ConfigError):
        ScoreSDEConfig(embedding_type="fourier")


def test_adapters_on_real_tiny_networks_give_image_shaped_epsilon():
    x, t = _inputs()
    with torch.no_grad():
        for adapter in (GuidedDiffusionEps(GuidedDiffusionUNet(TINY_GUIDED).eval()),
                        ScoreSDEEps(ScoreSDENet(TINY_SDE).eval())):
            eps = adapter(x, t)
            assert eps.shape == x.shape and torch.isfinite(eps).all()


# --- the forward computation's conventions ------------------------------------------------------

def test_timestep_embeddings_follow_each_codebase():
    t = torch.tensor([0.0, 3.0])
    g, s = guided_embedding(t, 8), sde_embedding(t, 8)
    assert torch.equal(g[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos | sin, frequencies 10000^(-i/4)
    assert torch.allclose(g[1, [1, 5]], torch.tensor([math.cos(0.3), math.sin(0.3)]))
    assert torch.equal(s[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin | cos, frequencies 10000^(-i/3)
    assert torch.allclose(s[1, [3, 7]], torch.tensor([math.sin(3e-4), math.cos(3e-4)]))


def test_guided_attention_uses_the_legacy_heads_first_qkv_layout():
    torch.manual_seed(0)
    block = GuidedDiffusionUNet(TINY_GUIDED).input_blocks[3][1]  # 64 channels, 4 heads
    x = torch.randn(2, 64, 8, 8)
    qkv = block.qkv(block.norm(x.reshape(2, 64, -1))).reshape(2 * 4, 3 * 16, 64)
    q, k, v = qkv[:, :16], qkv[:, 16:32], qkv[:, 32:]
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(16), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weights, v).reshape(2, 64, 64)
    expected = x + block.proj_out(attended).reshape(2, 64, 8, 8)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_score_sde_attention_is_single_head_over_pixels_with_skip_rescale():
    torch.manual_seed(0)
    net = ScoreSDENet(TINY_SDE)
    block = next(m for m in net.all_modules if hasattr(m, "NIN_0"))
    x = torch.randn(2, 32, 8, 8)
    def nin(n, h):
        return torch.einsum("bchw,cd->bdhw", h, n.W) + n.b[:, None, None]

    h = block.GroupNorm_0(x)
    q, k, v = (nin(n, h) for n in (block.NIN_0, block.NIN_1, block.NIN_2))
    w = torch.softmax(torch.einsum("bchw,bcij->bhwij", q, k).reshape(2, 8, 8, 64) / math.sqrt(32), dim=-1)
    out = torch.einsum("bhwij,bcij->bchw", w.reshape(2, 8, 8, 8, 8), v)
    expected = (x + nin(block.NIN_3, out)) / math.sqrt(2)
    assert torch.allclose(block(x), expected, atol=1e-5)


# --- bad files ----------------------------------------------------------------------------------

def test_mismatched_config_and_truncated_files_raise_checkpoint_error(tmp_path):
    torch.save(GuidedDiffusionUNet(TINY_GUIDED).state_dict(), tmp_path / "g.pt")
    other = GuidedDiffusionConfig(**{**TINY_GUIDED.to_dict(), "out_channels": 3})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_guided_diffusion(tmp_path / "g.pt", other)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_guided_diffusion(tmp_path / "g.pt", GuidedDiffusionConfig(**{**TINY_GUIDED.to_dict(),
                                                                          "num_res_blocks": 0}))
    data = (tmp_path / "g.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_guided_diffusion(tmp_path / "cut.pt", TINY_GUIDED)
    _sde_checkpoint(tmp_path / "short.pth", shadow_transform=lambda ps: ps[:-1])
    with pytest.raises(CheckpointError, match="EMA tensors"):
        load_score_sde(tmp_path / "short.pth", TINY_SDE)
    _sde_checkpoint(tmp_path / "wide.pth", config=ScoreSDEConfig(**{**TINY_SDE.to_dict(), "nf": 32}))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_score_sde(tmp_path / "wide.pth", TINY_SDE)


class _Payload:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {}, "ema": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="pickled"):
        load_score_sde(tmp_path / "evil.pth", TINY_SDE)
