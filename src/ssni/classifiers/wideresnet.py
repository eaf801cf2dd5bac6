"""Wide ResNets in the state-dict layouts of RobustBench's CIFAR checkpoints.

Written here from the published parameter names and shapes (no robustbench import), so the
public checkpoints load strictly and give the published logits:

* :class:`WideResNet`: the TRADES-style pre-activation WRN that RobustBench's ``Standard``
  CIFAR-10 model (WRN-28-10, 36,479,194 parameters) and many Linf entries use. Keys:
  ``conv1``, ``block{1,2,3}.layer.i.{bn1,conv1,bn2,conv2}``, ``block{2,3}.layer.0.convShortcut``
  (and ``block1.layer.0.convShortcut`` when the width changes), ``bn1``, ``fc``. Optional
  ``sub_block1`` (an unused copy of ``block1`` that some checkpoints carry). ``Standard`` has no
  input normalisation (trained on raw [0, 1] images). The same class, with dropout 0.3 and the
  CIFAR-10 normalisation inside (``mean``/``std`` kept out of the state dict, as the original
  holds them as plain attributes), is the *standard* WRN-70-16 that DiffPure and the SSNI
  authors evaluate (their ``WideResNet_70_16_dropout``, file ``wrn-70-16-dropout/weights.pt``,
  every key under ``module.``): :func:`paper_wrn_70_16_config`.
* :class:`DMWideResNet`: DeepMind's WRN (Gowal et al. 2020, Rebuffi et al. 2021, ...), e.g.
  ``Gowal2020Uncovering_70_16_extra`` (WRN-70-16, Swish). ``mean``/``std`` are buffers of
  shape ``[3, 1, 1]`` kept *out* of the state dict (non-persistent, as in RobustBench, whose
  files lack them; a file that holds them is accepted and its values are used). Keys:
  ``init_conv``, ``layer.g.block.i.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}``,
  ``batchnorm``, ``logits``. Its first conv of a block has no built-in padding: input is padded
  by 1 on every side for stride 1 and by (0, 1, 0, 1) (right/bottom only, TensorFlow ``SAME``)
  for stride 2. Normalisation happens inside, so it also takes [0, 1] images.

Both end in an 8x8 average pool, as published, and so take 32x32 images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..weights_io import load_state_dict, match_state_dict
from ..errors import CheckpointError, ConfigError, InputError
from .resnet import load_into, prepare_state_dict
from ..dictconfig import DictConfig

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
_ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU}  # Swish x * sigmoid(x) is SiLU


def _check_depth(depth: int, width: int) -> None:
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ConfigError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 28, 34, 70, ...), got {depth}")
    if width < 1:
        raise ConfigError(f"WRN width must be >= 1, got {width}")


def _pool_8x8(out: Tensor) -> Tensor:
    """The published head's ``avg_pool2d(out, 8)``; refuses maps that do not pool to 1x1."""
    if out.shape[-2:] != (8, 8):
        raise InputError(f"this WRN expects 32x32 images (8x8 final map), got a {tuple(out.shape[-2:])} map")
    return F.avg_pool2d(out, 8).flatten(1)


@dataclass(frozen=True)
class WideResNetConfig(DictConfig):
    """Shape of a :class:`WideResNet` (defaults: RobustBench ``Standard``, WRN-28-10).

    Attributes:
        depth: ``6 n + 4``; each of the three groups has ``n`` blocks.
        widen_factor: Group widths are ``16, 32, 64`` times this.
        num_classes: Size of the logits.
        sub_block1: Add the unused ``sub_block1`` group some checkpoints (e.g. Carmon2019) hold.
        bias_last: Whether ``fc`` has a bias.
        drop_rate: Dropout between the two convolutions of a block (training mode only).
        mean: Per-channel mean subtracted inside, or ``None`` for no normalisation.
        std: Per-channel std divided inside (with ``mean``).
    """

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 10
    sub_block1: bool = False
    bias_last: bool = True
    drop_rate: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        _check_depth(self.depth, self.widen_factor)
        if (self.mean is None) != (self.std is None) or (self.mean is not None and not len(self.mean) == len(self.std) == 3):
            raise ConfigError(f"mean and std need three values each, or both None; got {self.mean} and {self.std}")
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate}")


def paper_wrn_70_16_config() -> WideResNetConfig:
    """The standard WRN-70-16 of DiffPure and SSNI (``WideResNet_70_16_dropout``).

    Depth 70, width 16, dropout 0.3, CIFAR-10 normalisation inside, [0, 1] inputs.
    """
    return WideResNetConfig(depth=70, widen_factor=16, drop_rate=0.3, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def _register_normalization(module: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """``mean``/``std`` buffers ``[C, 1, 1]``, non-persistent: published files do not hold them."""
    channels = len(mean)
    module.register_buffer("mean", torch.tensor(mean).view(channels, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(std).view(channels, 1, 1), persistent=False)


class _WRNBlock(nn.Module):
    """Pre-activation block; when the width changes the 1x1 shortcut sees the activated input."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = drop_rate
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        skip = x if self.convShortcut is None else self.convShortcut(a)
        out = F.dropout(F.relu(self.bn2(self.conv1(a))), p=self.drop_rate, training=self.training)
        return skip + self.conv2(out)


class _WRNGroup(nn.Module):
    """``count`` blocks under the key ``layer``; the first one strides and changes width."""

    def __init__(self, count: int, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*(_WRNBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, drop_rate)
                                     for i in range(count)))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """RobustBench's CIFAR WideResNet layout; ``forward(x: [B, 3, 32, 32] in [0, 1]) -> [B, num_classes]``.

    Normalises inside only when ``config.mean`` is set (the paper's WRN-70-16); the buffers
    are non-persistent, so the state dict holds the published keys only. The ``Standard``
    checkpoint was trained on raw [0, 1] images.
    """

    def __init__(self, config: WideResNetConfig = WideResNetConfig()):
        super().__init__()
        self.config = config
        if config.mean is not None:
            _register_normalization(self, config.mean, config.std)
        n, k, p = (config.depth - 4) // 6, config.widen_factor, config.drop_rate
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = _WRNGroup(n, widths[0], widths[1], 1, p)
        if config.sub_block1:
            self.sub_block1 = _WRNGroup(n, widths[0], widths[1], 1, p)
        self.block2 = _WRNGroup(n, widths[1], widths[2], 2, p)
        self.block3 = _WRNGroup(n, widths[2], widths[3], 2, p)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], config.num_classes, bias=config.bias_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.config.mean is not None:
            x = (x - self.mean) / self.std
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(_pool_8x8(F.relu(self.bn1(out))))


@dataclass(frozen=True)
class DMWideResNetConfig(DictConfig):
    """Shape of a :class:`DMWideResNet` (defaults: ``Gowal2020Uncovering_70_16_extra``).

    Attributes:
        depth: ``6 n + 4``; each of the three groups has ``n`` blocks.
        width: Group widths are ``16, 32, 64`` times this.
        num_classes: Size of the logits.
        activation: ``"swish"`` (Gowal/Rebuffi; same as SiLU) or ``"relu"``.
        mean: Per-channel mean subtracted inside (initial value of the ``mean`` buffer).
        std: Per-channel std divided inside (initial value of the ``std`` buffer).
        padding: Zero padding added to the [0, 1] image before normalising (0 as published).
    """

    depth: int = 70
    width: int = 16
    num_classes: int = 10
    activation: str = "swish"
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    padding: int = 0

    def __post_init__(self):
        _check_depth(self.depth, self.width)
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"mean and std need one value per channel, got {self.mean} and {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))


class _DMBlock(nn.Module):
    """DeepMind's pre-activation block, with TensorFlow ``SAME`` padding done by hand."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(c_in)
        self.conv_0 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(c_out)
        self.conv_1 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if c_in != c_out else None
        self.act = _ACTIVATIONS[activation]()
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.batchnorm_0(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.act(self.batchnorm_1(self.conv_0(F.pad(a, self._pad))))
        return skip + self.conv_1(out)


class _DMGroup(nn.Module):
    """``count`` DeepMind blocks under the key ``block``."""

    def __init__(self, count: int, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.block = nn.Sequential(*(_DMBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1,
                                              activation) for i in range(count)))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """DeepMind-style WRN as RobustBench ships it.

    ``forward(x: [B, 3, 32, 32] in [0, 1]) -> logits [B, num_classes]``; normalises with its
    ``mean``/``std`` buffers (non-persistent, as RobustBench registers them: its files lack them).
    """

    def __init__(self, config: DMWideResNetConfig = DMWideResNetConfig()):
        super().__init__()
        self.config = config
        channels = len(config.mean)
        _register_normalization(self, config.mean, config.std)
        n, k, act = (config.depth - 4) // 6, config.width, config.activation
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.init_conv = nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
        self.layer = nn.Sequential(_DMGroup(n, widths[0], widths[1], 1, act),
                                   _DMGroup(n, widths[1], widths[2], 2, act),
                                   _DMGroup(n, widths[2], widths[3], 2, act))
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.act = _ACTIVATIONS[act]()
        self.logits = nn.Linear(widths[3], config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.config.padding > 0:
            x = F.pad(x, (self.config.padding,) * 4)
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        return self.logits(_pool_8x8(self.act(self.batchnorm(out))))


def load_wideresnet(path: str | Path, config: WideResNetConfig = WideResNetConfig(),
                    allow_pickle: bool = False) -> WideResNet:
    """Load a RobustBench WRN checkpoint (e.g. ``Standard.pt``) safely and strictly.

    Returns:
        The model in eval mode: ``[B, 3, 32, 32] in [0, 1] -> [B, num_classes]``.

    Raises:
        CheckpointError: missing/truncated file, or keys/shapes that do not fit ``config``.
    """
    return load_into(WideResNet(config), path, allow_pickle)


def load_dm_wideresnet(path: str | Path, config: DMWideResNetConfig = DMWideResNetConfig(),
                       allow_pickle: bool = False) -> DMWideResNet:
    """Load a DeepMind-style checkpoint (e.g. ``Gowal2020Uncovering_70_16_extra.pt``) strictly.

    Returns:
        The model in eval mode: ``[B, 3, 32, 32] in [0, 1] -> [B, num_classes]``.

    RobustBench's files lack ``mean``/``std`` (non-persistent there and here); a file that
    holds them (as older exports do) is accepted, and its values replace the config's.

    Raises:
        CheckpointError: missing/truncated file, or keys/shapes that do not fit ``config``.
    """
    model = DMWideResNet(config)
    state = prepare_state_dict(load_state_dict(Path(path), allow_pickle=allow_pickle), model, str(path))
    for name in ("mean", "std"):
        value = state.pop(name, None)
        if value is not None:
            if value.shape != getattr(model, name).shape:
                raise CheckpointError(f"{path}: '{name}' has shape {tuple(value.shape)}, expected "
                                      f"{tuple(getattr(model, name).shape)} (one value per input channel)")
            getattr(model, name).copy_(value)
    match_state_dict(model, state, str(path))
    return model.eval()


def load_paper_wrn_70_16(path: str | Path, config: WideResNetConfig | None = None,
                         allow_pickle: bool = False) -> WideResNet:
    """Load DiffPure/SSNI's standard WRN-70-16 (``wrn-70-16-dropout/weights.pt``) strictly.

    The file is a plain state dict with every key under ``module.`` (the authors strip those 7
    characters before loading); ``config`` defaults to :func:`paper_wrn_70_16_config`.

    Returns:
        The model in eval mode: ``[B, 3, 32, 32] in [0, 1] -> [B, 10]`` (normalises inside).
    """
    return load_into(WideResNet(config or paper_wrn_70_16_config()), path, allow_pickle)


__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "DMWideResNet", "DMWideResNetConfig", "WideResNet", "WideResNetConfig",
    "load_dm_wideresnet", "load_paper_wrn_70_16", "load_wideresnet", "paper_wrn_70_16_config",
]
