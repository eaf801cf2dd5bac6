"""EDM's CIFAR-10 networks: SongUNet (DDPM++ / NCSN++) under VP, VE or EDM preconditioning.

Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative
Models". The published CIFAR-10 files (``edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl``)
are pickles of whole Python objects whose class source code travels inside them;
:mod:`ssni.checkpoints.edm_pickle` reads their tensors without running that code,
``ssni convert`` turns one into a safetensors file, and :func:`ssni.checkpoints.edm_files.load_edm`
loads either into the modules defined here.

The modules here are our own; only their parameter names and shapes follow the
published state dicts (``model.enc.32x32_conv.weight``, ``model.dec.16x16_block4.qkv.weight``,
...), so a converted file loads strictly. A denoiser speaks EDM's convention,
``D(x, sigma) -> x0_hat`` with ``x = x0 + sigma * eps`` and ``x0`` in ``[-1, 1]``; wrap it in
:class:`~ssni.denoisers.protocol.EDMAdapter` to get the eps protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dictconfig import DictConfig
from ..errors import ConfigError

PRECONDITIONINGS = ("vp", "ve", "edm")


@dataclass(frozen=True)
class SongUNetConfig(DictConfig):
    """Shape of a :class:`SongUNet`; the defaults are EDM's CIFAR-10 DDPM++ (``--arch=ddpmpp``).

    NCSN++ (``--arch=ncsnpp``) is ``embedding_type="fourier"``, ``channel_mult_noise=2``,
    ``encoder_type="residual"``, ``resample_filter=(1, 3, 3, 1)``.
    """

    img_resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    label_dim: int = 0
    augment_dim: int = 9
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.13
    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple[int, ...] = (1, 1)

    def __post_init__(self) -> None:
        for name, allowed in (("embedding_type", ("positional", "fourier")),
                              ("encoder_type", ("standard", "skip", "residual")),
                              ("decoder_type", ("standard", "skip"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"SongUNetConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")


@dataclass(frozen=True)
class EDMConfig:
    """A denoiser: the network's shape and the preconditioning wrapped around it."""

    unet: SongUNetConfig = SongUNetConfig()
    precond: str = "vp"
    beta_d: float = 19.9  # VP
    beta_min: float = 0.1  # VP
    M: int = 1000  # VP: number of DDPM steps the noise labels are scaled to
    sigma_data: float = 0.5  # EDM

    def __post_init__(self) -> None:
        if self.precond not in PRECONDITIONINGS:
            raise ConfigError(f"EDM preconditioning {self.precond!r} is not supported; expected one of "
                              f"{PRECONDITIONINGS} (iDDPM needs DhariwalUNet, which is not implemented)")

    def to_dict(self) -> dict:
        return {"unet": self.unet.to_dict(), "precond": self.precond, "beta_d": self.beta_d,
                "beta_min": self.beta_min, "M": self.M, "sigma_data": self.sigma_data}

    @classmethod
    def from_dict(cls, data: dict) -> EDMConfig:
        fields = dict(data)
        return cls(unet=SongUNetConfig.from_dict(fields.pop("unet")), **fields)


class _Linear(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, bias: bool = True):
        super().__init__()
        bound = math.sqrt(6 / (fan_in + fan_out))
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _Conv(nn.Module):
    """3x3/1x1 convolution (``kernel=0``: none) with optional 2x resampling by a separable FIR filter.

    ``fused`` convolves at full resolution before downsampling (NCSN++'s residual encoder).
    """

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: tuple[int, ...] = (1, 1), fused: bool = False,
                 init_scale: float = 1.0):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.up, self.down, self.fused = up, down, fused
        if kernel:
            bound = init_scale * math.sqrt(6 / ((cin + cout) * kernel * kernel))
            self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        else:
            self.weight = self.bias = None
        if up or down:
            taps = torch.as_tensor(resample_filter, dtype=torch.float32)
            self.register_buffer("resample_filter", (taps.outer(taps) / taps.sum().square())[None, None])

    def forward(self, x: Tensor) -> Tensor:
        w, pad = self.weight, (self.weight.shape[-1] // 2 if self.weight is not None else 0)
        f = self.resample_filter if (self.up or self.down) else None
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused and self.down and w is not None:
            x = F.conv2d(x, w, padding=pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=pad)
        return x if self.bias is None else x + self.bias[None, :, None, None]


class _GroupNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = min(32, channels // 4), eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class _Block(nn.Module):
    """Residual block (additive time embedding) with optional resampling and one-head attention."""

    def __init__(self, cin: int, cout: int, emb: int, cfg: SongUNetConfig, up: bool = False,
                 down: bool = False, attention: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.attention = cin, cout, attention
        self.dropout = cfg.dropout
        self.norm0 = _GroupNorm(cin)
        self.conv0 = _Conv(cin, cout, 3, up=up, down=down, resample_filter=cfg.resample_filter)
        self.affine = _Linear(emb, cout)
        self.norm1 = _GroupNorm(cout)
        self.conv1 = _Conv(cout, cout, 3, init_scale=1e-5)
        self.skip = (_Conv(cin, cout, 1, up=up, down=down, resample_filter=cfg.resample_filter)
                     if cin != cout or up or down else None)
        if attention:
            self.norm2 = _GroupNorm(cout)
            self.qkv = _Conv(cout, 3 * cout, 1, init_scale=math.sqrt(0.2))
            self.proj = _Conv(cout, cout, 1, init_scale=1e-5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * math.sqrt(0.5)
        if self.attention:
            b, c, height, width = x.shape
            # The published qkv weights interleave channels as (c, [q, k, v]).
            q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, height * width).unbind(2)
            weights = torch.einsum("bcq,bck->bqk", q, k / math.sqrt(c)).softmax(dim=2)
            attended = torch.einsum("bqk,bck->bcq", weights, v).reshape(b, c, height, width)
            x = (self.proj(attended) + x) * math.sqrt(0.5)
        return x


class _PositionalEmbedding(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1))
        angles = x.float().outer(freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class _FourierEmbedding(nn.Module):
    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = x.float().outer(2 * math.pi * self.freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def _encoder(cfg: SongUNetConfig, emb: int) -> tuple[nn.ModuleDict, int]:
    """SongUNet's encoder, highest resolution first, and its output channels.

    Module names (and their insertion order) are the published state dict's.
    """
    enc = nn.ModuleDict()
    cout = caux = cfg.in_channels
    for level, mult in enumerate(cfg.channel_mult):
        res = cfg.img_resolution >> level
        if level == 0:
            enc[f"{res}x{res}_conv"] = _Conv(cout, cfg.model_channels, 3)
            cout = cfg.model_channels
        else:
            caux = _encoder_down(enc, cfg, emb, res, cout, caux)
        for idx in range(cfg.num_blocks):
            cin, cout = cout, cfg.model_channels * mult
            enc[f"{res}x{res}_block{idx}"] = _Block(cin, cout, emb, cfg,
                                                    attention=res in cfg.attn_resolutions)
    return enc, cout


def _encoder_down(enc: nn.ModuleDict, cfg: SongUNetConfig, emb: int, res: int, cout: int, caux: int) -> int:
    """Add the downsampling block into resolution ``res`` and the encoder's auxiliary path
    (NCSN++'s ``skip`` or ``residual`` input pyramid); returns the auxiliary path's channels."""
    enc[f"{res}x{res}_down"] = _Block(cout, cout, emb, cfg, down=True)
    if cfg.encoder_type == "skip":
        enc[f"{res}x{res}_aux_down"] = _Conv(caux, caux, 0, down=True, resample_filter=cfg.resample_filter)
        enc[f"{res}x{res}_aux_skip"] = _Conv(caux, cout, 1)
    if cfg.encoder_type == "residual":
        enc[f"{res}x{res}_aux_residual"] = _Conv(caux, cout, 3, down=True, fused=True,
                                                 resample_filter=cfg.resample_filter)
        caux = cout
    return caux


def _decoder(cfg: SongUNetConfig, emb: int, cout: int, skips: list[int]) -> nn.ModuleDict:
    """SongUNet's decoder, lowest resolution first; ``skips`` are the encoder outputs' channels
    (consumed from the end, as the forward pass pops them)."""
    dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        res = cfg.img_resolution >> level
        if level == len(cfg.channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = _Block(cout, cout, emb, cfg, attention=True)
            dec[f"{res}x{res}_in1"] = _Block(cout, cout, emb, cfg)
        else:
            dec[f"{res}x{res}_up"] = _Block(cout, cout, emb, cfg, up=True)
        for idx in range(cfg.num_blocks + 1):
            cin, cout = cout + skips.pop(), cfg.model_channels * mult
            dec[f"{res}x{res}_block{idx}"] = _Block(
                cin, cout, emb, cfg, attention=idx == cfg.num_blocks and res in cfg.attn_resolutions)
        if cfg.decoder_type == "skip" or level == 0:
            _decoder_head(dec, cfg, res, level, cout)
    return dec


def _decoder_head(dec: nn.ModuleDict, cfg: SongUNetConfig, res: int, level: int, cout: int) -> None:
    """Add the output head at resolution ``res`` (every resolution for a ``skip`` decoder, whose
    lower-resolution outputs are upsampled and summed; the last one otherwise)."""
    if cfg.decoder_type == "skip" and level < len(cfg.channel_mult) - 1:
        dec[f"{res}x{res}_aux_up"] = _Conv(cfg.out_channels, cfg.out_channels, 0, up=True,
                                           resample_filter=cfg.resample_filter)
    dec[f"{res}x{res}_aux_norm"] = _GroupNorm(cout)
    dec[f"{res}x{res}_aux_conv"] = _Conv(cout, cfg.out_channels, 3, init_scale=1e-5)


class SongUNet(nn.Module):
    """EDM's re-implementation of DDPM++/NCSN++: ``F(x, noise_labels, class_labels)``."""

    def __init__(self, cfg: SongUNetConfig = SongUNetConfig()):
        super().__init__()
        self.cfg = cfg
        emb = cfg.model_channels * cfg.channel_mult_emb
        noise = cfg.model_channels * cfg.channel_mult_noise
        # Built in the published order: parameter initialisation draws from the global RNG in this order.
        self.map_noise = (_PositionalEmbedding(noise) if cfg.embedding_type == "positional"
                          else _FourierEmbedding(noise))
        self.map_label = _Linear(cfg.label_dim, noise) if cfg.label_dim else None
        self.map_augment = _Linear(cfg.augment_dim, noise, bias=False) if cfg.augment_dim else None
        self.map_layer0 = _Linear(noise, emb)
        self.map_layer1 = _Linear(emb, emb)
        self.enc, cout = _encoder(cfg, emb)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]
        self.dec = _decoder(cfg, emb, cout, skips)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(noise_labels).to(x.dtype)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # sin first, as published
        if self.map_label is not None:
            labels = class_labels if class_labels is not None else x.new_zeros(1, self.cfg.label_dim)
            emb = emb + self.map_label(labels * math.sqrt(self.cfg.label_dim))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, _Block) else block(x)
                skips.append(x)

        out = normed = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                out = block(out)
            elif "aux_norm" in name:
                normed = block(x)
            elif "aux_conv" in name:
                head = block(F.silu(normed))
                out = head if out is None else head + out
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


class EDMDenoiser(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with EDM's VP, VE or EDM coefficients."""

    def __init__(self, cfg: EDMConfig = EDMConfig()):
        super().__init__()
        self.cfg = cfg
        self.model = SongUNet(cfg.unet)

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        """VP time ``t in [0, 1]`` at which the continuous VP-SDE has noise ``sigma``."""
        b_min, b_d = self.cfg.beta_min, self.cfg.beta_d
        return ((b_min ** 2 + 2 * b_d * torch.log1p(sigma ** 2)).sqrt() - b_min) / b_d

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        if self.cfg.precond == "vp":
            c_skip, c_out, c_in = 1.0, -sigma, 1 / (sigma ** 2 + 1).sqrt()
            c_noise = (self.cfg.M - 1) * self.sigma_inv(sigma)
        elif self.cfg.precond == "ve":
            c_skip, c_out, c_in, c_noise = 1.0, sigma, 1.0, (0.5 * sigma).log()
        else:
            data = self.cfg.sigma_data
            c_skip = data ** 2 / (sigma ** 2 + data ** 2)
            c_out = sigma * data / (sigma ** 2 + data ** 2).sqrt()
            c_in, c_noise = 1 / (data ** 2 + sigma ** 2).sqrt(), sigma.log() / 4
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), class_labels)


__all__ = ["EDMConfig", "EDMDenoiser", "PRECONDITIONINGS", "SongUNet", "SongUNetConfig"]
