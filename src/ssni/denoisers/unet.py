"""A small DDPM-style UNet: the project's own epsilon network.

Residual blocks with GroupNorm and SiLU, a sinusoidal embedding of the noise
level added inside every block, stride-2 down/up sampling, optional self-attention
at the lowest resolution (Ho et al., 2020, scaled down). Works for 1 or 3
channels at 28x28 or 32x32 (any size divisible by ``2 ** (len(mults) - 1)``).
It speaks the project protocol directly: ``forward(x_t [B,C,H,W] in [-1,1], t [B]
levels in 1..T) -> eps_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from ..dictconfig import DictConfig


@dataclass(frozen=True)
class UNetConfig(DictConfig):
    """Shape of a :class:`UNet` (saved next to its weights)."""

    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    attention: bool = False
    dropout: float = 0.0


def level_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of real-valued levels ``t: [B]`` -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.qkv = _norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(attn.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Epsilon-prediction UNet; see :class:`UNetConfig` for its shape."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        base, emb_dim = config.base_channels, 4 * config.base_channels
        self.emb = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(config.in_channels, base, 3, padding=1)
        widths = [base * m for m in config.channel_mults]
        self.down, self.downsample, skips = nn.ModuleList(), nn.ModuleList(), [base]
        c = base
        for i, width in enumerate(widths):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock(c, width, emb_dim, config.dropout))
                c = width
                skips.append(c)
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)
        self.mid1 = ResBlock(c, c, emb_dim, config.dropout)
        self.mid_attn = Attention(c) if config.attention else nn.Identity()
        self.mid2 = ResBlock(c, c, emb_dim, config.dropout)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb_dim, config.dropout))
                c = width
            self.upsample.append(nn.Identity() if i == 0 else nn.Upsample(scale_factor=2, mode="nearest"))
        self.head = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, config.in_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.emb(level_embedding(t, self.config.base_channels))
        h = self.stem(x)
        hs, blocks = [h], iter(self.down)
        for down in self.downsample:
            for _ in range(self.config.blocks_per_level):
                h = next(blocks)(h, emb)
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        blocks = iter(self.up)
        for up in self.upsample:
            for _ in range(self.config.blocks_per_level + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if not isinstance(up, nn.Identity):
                h = up(h)
                h = self._match(h, hs[-1])
        return self.head(h)

    @staticmethod
    def _match(h: Tensor, skip: Tensor) -> Tensor:
        """Crop an upsampled map to its skip (7 -> 14 is exact, odd sizes are cropped)."""
        return h[..., : skip.shape[-2], : skip.shape[-1]]
