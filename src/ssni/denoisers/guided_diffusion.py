"""The ADM UNet of OpenAI's guided-diffusion, re-implemented with its checkpoint layout.

Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis". The
published ``256x256_diffusion_uncond.pt`` is a plain state dict (it loads with
``torch.load(weights_only=True)``) of a UNet built with image size 256, 256 base
channels, channel multipliers ``(1, 1, 2, 2, 4, 4)``, two residual blocks per
level, attention at the 32, 16 and 8 pixel feature maps with 64 channels per
head, residual blocks for up/down sampling, FiLM-style scale-shift norm and
learned variances (6 output channels: epsilon, then the variance interpolation).

:class:`GuidedDiffusionUNet` reproduces that network's parameter names and
shapes exactly (``time_embed.*``, ``input_blocks.N.*``, ``middle_block.*``,
``output_blocks.N.*``, ``out.*``) so the published weights load strictly.
:class:`GuidedDiffusionEps` adapts it to the project protocol: guided-diffusion
indexes its 1000 linear-beta steps 0..999 (``rescale_timesteps=False``), so our
level ``t`` is fed as ``t - 1`` and the first ``C`` output channels are returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..weights_io import load_state_dict, match_state_dict
from ..errors import ConfigError
from ..dictconfig import DictConfig
from .protocol import EpsAdapter

GROUPS = 32  # guided-diffusion normalises with 32 groups everywhere


@dataclass(frozen=True)
class GuidedDiffusionConfig(DictConfig):
    """Shape of a :class:`GuidedDiffusionUNet`; defaults are ``256x256_diffusion_uncond.pt``.

    Attributes:
        image_size: side of the square input images.
        in_channels: image channels.
        model_channels: base width (``--num_channels``).
        out_channels: 6 with learned variances (``--learn_sigma True``), else 3.
        num_res_blocks: residual blocks per level.
        attention_resolutions: feature-map sides that get self-attention (the
            ``--attention_resolutions`` flag; downsample rate = ``image_size // r``).
        channel_mult: width multiplier of each level (may hold 0.5).
        num_heads: attention heads when ``num_head_channels == -1``.
        num_head_channels: fixed channels per head (overrides ``num_heads``).
        num_heads_upsample: heads in the decoder when ``num_head_channels == -1``
            (``-1`` means ``num_heads``).
        use_scale_shift_norm: FiLM conditioning ``norm(h) * (1 + scale) + shift``.
        resblock_updown: resample with residual blocks instead of plain layers.
        conv_resample: plain resampling layers carry a 3x3 convolution.
        use_new_attention_order: split q/k/v before heads (False: the legacy order).
        dropout: dropout inside residual blocks.
        use_checkpoint: gradient checkpointing per block (memory only, same numbers).
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        for mult in self.channel_mult:
            width = int(mult * self.model_channels)
            if width % GROUPS:
                raise ConfigError(f"level width {width} (= {mult} x {self.model_channels}) is not "
                                  f"divisible by the {GROUPS} norm groups; pick model_channels accordingly")
            if self.num_head_channels != -1 and width % self.num_head_channels:
                raise ConfigError(f"level width {width} is not divisible by num_head_channels "
                                  f"{self.num_head_channels}")

    @property
    def attention_rates(self) -> tuple[int, ...]:
        """Downsample rates (1, 2, 4, ...) at which attention runs."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    def widths(self) -> list[int]:
        """Channel width of each level."""
        return [int(m * self.model_channels) for m in self.channel_mult]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """guided-diffusion's sinusoidal embedding ``[B] -> [B, dim]``: cosines first, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)
    return F.pad(emb, (0, dim % 2))


class _GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as the original does)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def _norm(channels: int) -> _GroupNorm32:
    return _GroupNorm32(GROUPS, channels)


def _resample(x: Tensor, mode: str | None) -> Tensor:
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


class _ResBlock(nn.Module):
    """Residual block with time conditioning; optionally resamples by 2 (``mode``)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, config: GuidedDiffusionConfig,
                 mode: str | None = None):
        super().__init__()
        self.mode, self.scale_shift = mode, config.use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        emb_out = 2 * c_out if self.scale_shift else c_out
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, emb_out))
        self.out_layers = nn.Sequential(_norm(c_out), nn.SiLU(), nn.Dropout(config.dropout),
                                        nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
        h = conv(_resample(norm_act(x), self.mode))
        x = _resample(x, self.mode)
        cond = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = cond.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + cond)
        return self.skip_connection(x) + h


class _Attention(nn.Module):
    """Multi-head self-attention over all positions (1-D convs as in the checkpoint)."""

    def __init__(self, channels: int, heads: int, new_order: bool):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        head_dim, length = c // self.heads, flat.shape[-1]
        if self.new_order:  # q | k | v, each split into heads
            q, k, v = (part.reshape(b * self.heads, head_dim, length) for part in qkv.chunk(3, dim=1))
        else:  # legacy: heads first, each holding its own q | k | v
            q, k, v = qkv.reshape(b * self.heads, 3 * head_dim, length).split(head_dim, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, c, length)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class _Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class _EmbedSequential(nn.Sequential):
    """A sequence whose residual blocks also receive the time embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ResBlock) else layer(x)
        return x


class GuidedDiffusionUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (unconditional), keys identical to the published files.

    ``forward(x [B, C, H, W] in [-1, 1], timesteps [B] in 0..999) -> [B, out_channels, H, W]``;
    with learned sigma, channels ``:C`` are epsilon and ``C:`` the variance interpolation
    ``v`` in ``[-1, 1]`` (log-variance ``= v' log beta + (1 - v') log beta_tilde``, ``v' = (v+1)/2``).
    Fresh weights use PyTorch's default init: this class exists to load published weights.
    """

    def __init__(self, config: GuidedDiffusionConfig = GuidedDiffusionConfig()):
        super().__init__()
        self.config = config
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        widths = config.widths()
        self.input_blocks = nn.ModuleList(
            [_EmbedSequential(nn.Conv2d(config.in_channels, widths[0], 3, padding=1))])
        skips = self._build_encoder(widths, emb_dim)
        ch = widths[-1]
        self.middle_block = _EmbedSequential(
            _ResBlock(ch, ch, emb_dim, config), self._attention(ch, config.num_heads),
            _ResBlock(ch, ch, emb_dim, config))
        self.output_blocks = nn.ModuleList()
        self._build_decoder(widths, emb_dim, skips)
        self.out = nn.Sequential(_norm(widths[0]), nn.SiLU(),
                                 nn.Conv2d(widths[0], config.out_channels, 3, padding=1))

    def _attention(self, channels: int, heads: int) -> _Attention:
        per_head = self.config.num_head_channels
        n_heads = heads if per_head == -1 else channels // per_head
        return _Attention(channels, n_heads, self.config.use_new_attention_order)

    def _build_encoder(self, widths: list[int], emb_dim: int) -> list[int]:
        cfg, ch, rate, skips = self.config, widths[0], 1, [widths[0]]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [_ResBlock(ch, width, emb_dim, cfg)]
                ch = width
                if rate in cfg.attention_rates:
                    layers.append(self._attention(ch, cfg.num_heads))
                self.input_blocks.append(_EmbedSequential(*layers))
                skips.append(ch)
            if level != len(widths) - 1:
                down = (_ResBlock(ch, ch, emb_dim, cfg, mode="down") if cfg.resblock_updown
                        else _Downsample(ch, cfg.conv_resample))
                self.input_blocks.append(_EmbedSequential(down))
                skips.append(ch)
                rate *= 2
        return skips

    def _build_decoder(self, widths: list[int], emb_dim: int, skips: list[int]) -> None:
        cfg, ch = self.config, widths[-1]
        rate = 2 ** (len(widths) - 1)
        heads = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        for level in reversed(range(len(widths))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [_ResBlock(ch + skips.pop(), widths[level], emb_dim, cfg)]
                ch = widths[level]
                if rate in cfg.attention_rates:
                    layers.append(self._attention(ch, heads))
                if level and i == cfg.num_res_blocks:
                    layers.append(_ResBlock(ch, ch, emb_dim, cfg, mode="up") if cfg.resblock_updown
                                  else _Upsample(ch, cfg.conv_resample))
                    rate //= 2
                self.output_blocks.append(_EmbedSequential(*layers))

    def _run(self, block: _EmbedSequential, h: Tensor, emb: Tensor) -> Tensor:
        if self.config.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class GuidedDiffusionEps(EpsAdapter):
    """Adapt a guided-diffusion UNet to the project protocol ``model(x_t, t) -> eps_hat``.

    Args:
        unet: a :class:`GuidedDiffusionUNet` (or any module with its call signature)
            trained on the DDPM linear-beta schedule with 1000 steps.

    ``forward(x_t [B, C, H, W] in [-1, 1], t [B] levels 1..1000) -> eps_hat [B, C, H, W]``:
    the UNet gets the 0-based step index ``t - 1`` (guided-diffusion's ``alphas_cumprod[t - 1]``
    is our ``abar(t)``) and its first ``C`` output channels are returned.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        out = self.unet(x_t, t - 1)
        return out[:, : x_t.shape[1]]


def load_guided_diffusion(path: str | Path, config: GuidedDiffusionConfig = GuidedDiffusionConfig(),
                          allow_pickle: bool = False) -> GuidedDiffusionUNet:
    """Build a :class:`GuidedDiffusionUNet` and load a published state dict into it, strictly.

    Args:
        path: a guided-diffusion ``.pt`` (plain state dict, read with ``weights_only=True``)
            or a ``.safetensors`` conversion of it.
        config: the network's shape; the default fits ``256x256_diffusion_uncond.pt``.
        allow_pickle: unpickle arbitrary objects (only for files you trust).

    Returns:
        The network in eval mode on the CPU (wrap it in :class:`GuidedDiffusionEps`).

    Raises:
        CheckpointError: missing, unreadable or truncated file, or keys/shapes that do not fit.
    """
    state = load_state_dict(Path(path), allow_pickle=allow_pickle)
    net = GuidedDiffusionUNet(config)
    match_state_dict(net, state, str(path))
    return net.eval()


__all__ = ["GuidedDiffusionConfig", "GuidedDiffusionEps", "GuidedDiffusionUNet", "load_guided_diffusion",
           "timestep_embedding"]
