"""DDPM++ (NCSN++ family) of score_sde_pytorch, re-implemented with its checkpoint layout.

Song et al. (2021), "Score-Based Generative Modeling through Stochastic
Differential Equations". DiffPure (Nie et al., 2022) purifies CIFAR-10 with the
``vp/cifar10_ddpmpp_deep_continuous`` model (``checkpoint_8.pth``): nf 128,
channel multipliers ``(1, 2, 2, 2)``, 8 BigGAN-style residual blocks per level,
attention at 16x16, skip rescaling by ``1/sqrt(2)``, sinusoidal ("positional")
time embedding, no FIR, no progressive growing, centered data in ``[-1, 1]``.

The network keeps the original's single ``all_modules`` list, so its keys are
``all_modules.N.*`` exactly as published (less the ``module.`` prefix that
``DataParallel`` added). The published file is a training checkpoint
``{'model', 'ema', 'optimizer', 'step'}``: ``model`` also holds the reference's
``sigmas`` buffer (unused by DDPM++, dropped on load), and the EMA weights are a bare
list ``ema['shadow_params']`` in ``model.parameters()`` order (no buffers), the ones
DiffPure samples with. :func:`load_score_sde` loads either, with ``weights_only``.

Noise conditioning (continuous VP-SDE, ``beta_min=0.1``, ``beta_max=20``): at time
``s in [0, 1]`` the network gets ``labels = 999 s`` and returns an epsilon-like
output; the score is ``-output / std(s)``, ``std(s) = sqrt(1 - abar_c(s))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..weights_io import load_state_dict, match_state_dict
from ..diffusion import VPSchedule
from ..errors import CheckpointError, ConfigError, InputError
from ..dictconfig import DictConfig
from .protocol import EpsAdapter

_SUPPORTED = {"resblock_type": "biggan", "progressive": "none", "progressive_input": "none",
              "embedding_type": "positional", "fir": False, "scale_by_sigma": False}


@dataclass(frozen=True)
class ScoreSDEConfig(DictConfig):
    """Shape of a :class:`ScoreSDENet`; defaults are DiffPure's CIFAR-10 ``checkpoint_8.pth``.

    Field names follow score_sde's ``config.data``/``config.model``. The fields in
    ``_SUPPORTED`` (resblock type, progressive growing, embedding, FIR, sigma
    scaling) are fixed to the DDPM++ values; other values raise :class:`ConfigError`.
    ``resamp_with_conv`` has no effect with BigGAN blocks and is kept for fidelity.
    """

    image_size: int = 32
    num_channels: int = 3
    centered: bool = True
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 8
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "none"
    embedding_type: str = "positional"
    fir: bool = False
    scale_by_sigma: bool = False

    def __post_init__(self) -> None:
        for name, value in _SUPPORTED.items():
            if getattr(self, name) != value:
                raise ConfigError(f"ScoreSDEConfig.{name}={getattr(self, name)!r} is not supported; "
                                  f"only the DDPM++ setting {value!r} is implemented")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ConfigError(f"image_size {self.image_size} must be divisible by "
                              f"2^{len(self.ch_mult) - 1} for {len(self.ch_mult)} levels")

    def resolution(self, level: int) -> int:
        """Feature-map side at ``level`` (0 = full resolution)."""
        return self.image_size >> level


def timestep_embedding(labels: Tensor, dim: int, max_positions: float = 10000.0) -> Tensor:
    """score_sde's (DDPM's) sinusoidal embedding ``[B] -> [B, dim]``: sines first, then cosines.

    Frequencies are ``max_positions ** (-i / (half - 1))``, ``i = 0..half-1``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1) * torch.arange(half, device=labels.device))
    angles = labels.float()[:, None] * freqs[None]
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class _NIN(nn.Module):
    """Per-pixel linear map with parameters ``W: [in, out]`` and ``b: [out]`` (checkpoint layout)."""

    def __init__(self, c_in: int, c_out: int, scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(torch.empty(c_in, c_out))
        self.b = nn.Parameter(torch.zeros(c_out))
        nn.init.xavier_uniform_(self.W, gain=math.sqrt(scale))  # = fan_avg uniform variance scaling

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class _ResBlock(nn.Module):
    """BigGAN-style residual block (``ResnetBlockBigGANpp``); ``mode`` resamples by 2."""

    def __init__(self, c_in: int, c_out: int, config: ScoreSDEConfig, mode: str | None = None):
        super().__init__()
        temb_dim = 4 * config.nf
        self.mode, self.skip_rescale = mode, config.skip_rescale
        self.GroupNorm_0 = _gn(c_in)
        self.Conv_0 = _conv3x3(c_in, c_out)
        self.Dense_0 = nn.Linear(temb_dim, c_out)
        self.GroupNorm_1 = _gn(c_out)
        self.Dropout_0 = nn.Dropout(config.dropout)
        self.Conv_1 = _conv3x3(c_out, c_out)
        if c_in != c_out or mode is not None:
            self.Conv_2 = nn.Conv2d(c_in, c_out, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.mode == "up":
            return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        if self.mode == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        h = self.Conv_0(self._resample(F.silu(self.GroupNorm_0(x))))
        x = self._resample(x)
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class _AttnBlock(nn.Module):
    """Single-head self-attention over pixels (``AttnBlockpp``)."""

    def __init__(self, channels: int, skip_rescale: bool):
        super().__init__()
        self.skip_rescale = skip_rescale
        self.GroupNorm_0 = _gn(channels)
        self.NIN_0, self.NIN_1 = _NIN(channels, channels), _NIN(channels, channels)
        self.NIN_2, self.NIN_3 = _NIN(channels, channels), _NIN(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (nin(h).reshape(b, c, -1).transpose(1, 2) for nin in (self.NIN_0, self.NIN_1, self.NIN_2))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, height, width)
        out = x + self.NIN_3(h)
        return out / math.sqrt(2.0) if self.skip_rescale else out


class ScoreSDENet(nn.Module):
    """score_sde's ``NCSNpp`` in its DDPM++ setting, keys ``all_modules.N.*`` as published.

    ``forward(x [B, C, H, W], labels [B] real in [0, 999]) -> [B, C, H, W]``; for the
    continuous VP-SDE the output is epsilon-like (score ``= -output / std``). With
    ``centered=False`` the input is taken in ``[0, 1]`` and mapped to ``[-1, 1]`` inside,
    as in the original. Parameters are registered in the original's order, so
    ``parameters()`` lines up with the checkpoint's EMA ``shadow_params`` list.
    """

    def __init__(self, config: ScoreSDEConfig = ScoreSDEConfig()):
        super().__init__()
        self.config = config
        nf, modules = config.nf, []
        if config.conditional:
            modules += [nn.Linear(nf, 4 * nf), nn.Linear(4 * nf, 4 * nf)]
        modules.append(_conv3x3(config.num_channels, nf))
        skips = [nf]
        ch = self._add_encoder(modules, skips)
        modules += [_ResBlock(ch, ch, config), _AttnBlock(ch, config.skip_rescale), _ResBlock(ch, ch, config)]
        ch = self._add_decoder(modules, skips, ch)
        modules += [_gn(ch), _conv3x3(ch, config.num_channels)]
        self.all_modules = nn.ModuleList(modules)

    def _has_attention(self, level: int) -> bool:
        return self.config.resolution(level) in self.config.attn_resolutions

    def _add_encoder(self, modules: list, skips: list[int]) -> int:
        cfg, ch = self.config, self.config.nf
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                modules.append(_ResBlock(ch, cfg.nf * mult, cfg))
                ch = cfg.nf * mult
                if self._has_attention(level):
                    modules.append(_AttnBlock(ch, cfg.skip_rescale))
                skips.append(ch)
            if level != len(cfg.ch_mult) - 1:
                modules.append(_ResBlock(ch, ch, cfg, mode="down"))
                skips.append(ch)
        return ch

    def _add_decoder(self, modules: list, skips: list[int], ch: int) -> int:
        cfg = self.config
        for level in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                modules.append(_ResBlock(ch + skips.pop(), cfg.nf * cfg.ch_mult[level], cfg))
                ch = cfg.nf * cfg.ch_mult[level]
            if self._has_attention(level):
                modules.append(_AttnBlock(ch, cfg.skip_rescale))
            if level:
                modules.append(_ResBlock(ch, ch, cfg, mode="up"))
        return ch

    def _embed(self, labels: Tensor, mods) -> Tensor | None:
        if not self.config.conditional:
            return None
        temb = next(mods)(timestep_embedding(labels, self.config.nf))
        return next(mods)(F.silu(temb))

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        cfg = self.config
        if tuple(x.shape[-2:]) != (cfg.image_size, cfg.image_size):
            raise InputError(f"ScoreSDENet expects {cfg.image_size}x{cfg.image_size} images, "
                             f"found {tuple(x.shape[-2:])}")
        mods = iter(self.all_modules)
        temb = self._embed(labels, mods)
        hs = [next(mods)(x if cfg.centered else 2 * x - 1)]
        for level in range(len(cfg.ch_mult)):
            for _ in range(cfg.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                hs.append(next(mods)(h) if self._has_attention(level) else h)
            if level != len(cfg.ch_mult) - 1:
                hs.append(next(mods)(hs[-1], temb))
        mid_in, mid_attn, mid_out = next(mods), next(mods), next(mods)
        h = mid_out(mid_attn(mid_in(hs[-1], temb)), temb)
        for level in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if self._has_attention(level):
                h = next(mods)(h)
            if level:
                h = next(mods)(h, temb)
        norm, conv = next(mods), next(mods)
        return conv(F.silu(norm(h)))


class ScoreSDEEps(EpsAdapter):
    """Adapt a continuous-VP score_sde network to the protocol ``model(x_t, t) -> eps_hat``.

    Args:
        net: a :class:`ScoreSDENet` with ``centered=True`` (or any ``net(x, labels)``).
        time: how a level ``t`` becomes SDE time ``s``. ``"linear"`` (DiffPure's
            convention): ``s = t / 1000``. ``"matched"``: the ``s`` whose continuous
            ``abar_c(s) = exp(-0.1 s - 9.95 s^2)`` equals the discrete ``abar(t)``
            (clamped to ``s <= 1``). The two differ by under 1% in ``abar`` up to level 500.

    ``forward(x_t [B, C, H, W] in [-1, 1], t [B] levels 1..1000) -> eps_hat [B, C, H, W]``:
    the network gets ``labels = 999 s``; its output is returned unchanged, as
    score_sde's ``score = -output / std(s)`` makes the output epsilon.
    """

    def __init__(self, net: nn.Module, time: str = "linear"):
        super().__init__()
        if time not in ("linear", "matched"):
            raise ConfigError(f"time must be 'linear' or 'matched', found {time!r}")
        if not getattr(getattr(net, "config", None), "centered", True):
            raise ConfigError("ScoreSDEEps needs a network trained on centered data ([-1, 1]); "
                              "an uncentered VP model diffuses [0, 1] images, another state space")
        self.net, self.time = net, time

    def continuous_time(self, t: Tensor) -> Tensor:
        """SDE time ``s in (0, 1]`` for integer levels ``t: [B]`` (float32)."""
        if self.time == "linear":
            return t.float() / 1000.0
        schedule = VPSchedule()
        b0, b1 = schedule.beta_start * 1000, schedule.beta_end * 1000
        log_abar = schedule.abar(t).double().log()
        s = (-b0 + torch.sqrt(b0**2 - 2 * (b1 - b0) * log_abar)) / (b1 - b0)
        return s.clamp(max=1.0).float()  # levels 997..1000 map past 1 (up to 1.0034)

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        labels = 999.0 * self.continuous_time(t)
        return self.net(x_t, labels.to(x_t.device))


def _strip_prefix(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _drop_sigmas(state: dict, source: str) -> dict:
    """Remove the reference network's ``sigmas`` buffer from a state dict.

    score_sde's ``NCSNpp`` registers a persistent buffer ``sigmas`` (the SMLD noise table
    ``exp(linspace(log sigma_max, log sigma_min, num_scales))``, first in its state dict). In
    the DDPM++ setting (positional embedding, no sigma scaling) the forward pass never
    reads it, so it carries no weights: we accept it and leave it out.
    """
    sigmas = state.get("sigmas")
    if sigmas is not None and not (isinstance(sigmas, Tensor) and sigmas.dim() == 1):
        raise CheckpointError(f"{source}: 'sigmas' should be score_sde's 1-D noise table, "
                              f"found {type(sigmas).__name__} {tuple(getattr(sigmas, 'shape', ()))}")
    return {k: v for k, v in state.items() if k != "sigmas"}


def _ema_state(checkpoint: dict, names: list[str], source: str) -> dict[str, Tensor]:
    """Pair the EMA ``shadow_params`` list with parameter ``names`` (in the same order)."""
    ema = checkpoint.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(p, Tensor) for p in shadow):
        raise CheckpointError(f"{source} has no EMA weights (ema['shadow_params'], a list of tensors); "
                              "pass weights='model' to load the raw weights")
    if len(shadow) != len(names):
        raise CheckpointError(f"{source} holds {len(shadow)} EMA tensors, the network has {len(names)} "
                              "parameters: it is of another configuration, or truncated")
    return dict(zip(names, shadow))


def score_sde_state_dict(checkpoint: dict, net: nn.Module, weights: str = "ema",
                         source: str = "checkpoint") -> dict[str, Tensor]:
    """Extract a state dict for ``net`` from a score_sde training checkpoint.

    Args:
        checkpoint: the loaded file: ``{'model': {'module.sigmas', 'module.<key>': ...}, 'ema':
            {'decay', 'num_updates', 'shadow_params': [...]}, 'optimizer', 'step'}``, or a plain
            state dict (with or without the ``module.`` prefix and ``sigmas``).
        net: the network the weights are for (its parameter names give the EMA order).
        weights: ``"ema"`` (the averaged weights DiffPure uses) or ``"model"`` (raw).
        source: a name for error messages.

    The reference's ``ExponentialMovingAverage`` keeps one tensor per *parameter*, in
    ``model.parameters()`` order; buffers (its ``sigmas``) have none. So the EMA list is
    paired with ``net.named_parameters()`` (the same names in the same order as the
    reference ``NCSNpp``; checked by the golden test), never with the file's ``'model'``
    keys, which start with the ``sigmas`` buffer. ``sigmas`` is dropped (see :func:`_drop_sigmas`).
    """
    if weights not in ("ema", "model"):
        raise ConfigError(f"weights must be 'ema' or 'model', found {weights!r}")
    if "model" not in checkpoint and "ema" not in checkpoint:
        return _drop_sigmas(_strip_prefix(checkpoint), source)
    if weights == "model":
        model = checkpoint.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{source} has no 'model' state dict; use weights='ema'")
        return _drop_sigmas(_strip_prefix(model), source)
    return _ema_state(checkpoint, [name for name, _ in net.named_parameters()], source)


def load_score_sde(path: str | Path, config: ScoreSDEConfig = ScoreSDEConfig(), weights: str = "ema",
                   allow_pickle: bool = False) -> ScoreSDENet:
    """Build a :class:`ScoreSDENet` and load a score_sde checkpoint into it, strictly.

    Args:
        path: ``checkpoint_8.pth``-style training checkpoint (read with ``weights_only=True``),
            or a plain state dict (``.pt``/``.safetensors``).
        config: the network's shape; the default fits DiffPure's CIFAR-10 DDPM++ deep model.
        weights: ``"ema"`` (default, as DiffPure) or ``"model"``.
        allow_pickle: unpickle arbitrary objects (only for files you trust).

    Returns:
        The network in eval mode on the CPU (wrap it in :class:`ScoreSDEEps`).

    Raises:
        CheckpointError: unreadable/truncated file, missing EMA list, or keys/shapes that do not fit.
    """
    checkpoint = load_state_dict(Path(path), allow_pickle=allow_pickle)
    net = ScoreSDENet(config)
    match_state_dict(net, score_sde_state_dict(checkpoint, net, weights, str(path)), str(path))
    return net.eval()


__all__ = ["ScoreSDEConfig", "ScoreSDEEps", "ScoreSDENet", "load_score_sde", "score_sde_state_dict",
           "timestep_embedding"]
