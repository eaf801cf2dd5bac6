"""ResNets whose state dicts use published layouts, and safe loaders for their checkpoints.

Two layouts are covered, both written here from their published parameter names and shapes
(no torchvision import):

* ``stem="imagenet"``: torchvision's ImageNet ResNets (``conv1`` 7x7/2 + 3x3/2 max pool,
  blocks ``layerK.i.{conv,bn}{1,2,3}``, projection ``layerK.0.downsample.{0,1}``, head ``fc``;
  the bottleneck strides in its 3x3 conv, "ResNet v1.5"). ResNet-50 has 25,557,032 parameters.
  Those weights expect ImageNet-normalised input, so :class:`ImageNetResNet` divides
  ``(x - mean) / std`` inside and takes images in [0, 1]; its mean/std buffers are not
  persistent, so its state dict is exactly torchvision's (unprefixed keys).
* ``stem="cifar"``: the CIFAR-10 ResNets of the widely copied "pytorch-cifar" layout that
  AutoAttack's examples use (``conv1`` 3x3/1, no pool, projection ``layerK.0.shortcut.{0,1}``,
  head ``linear``).

AutoAttack's example classifier: PyPI ``pyautoattack`` 0.2.0 ships
``pyautoattack/examples/model_test.pt`` (44,754,497 bytes, sha256 ``399f52da...8425a7``).
Inspected without running its pickle, it is a plain ``collections.OrderedDict`` state dict in
torch's legacy (pre-1.6, non-zip) serialisation: 122 entries (conv/BN/linear tensors saved on
``cuda:0`` as ``FloatStorage``, ``num_batches_tracked`` as ``LongStorage``), no code objects;
the only globals the pickle names are ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage`` and ``torch.LongStorage``. It is a
ResNet-18 (BasicBlock, 2-2-2-2, 10 classes, 11,173,962 parameters) fed raw [0, 1] images (the
package's ``eval.py`` uses only ``ToTensor``), so ``torch.load(weights_only=True)`` reads it and
:func:`load_autoattack_resnet18` needs no unpickling of code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..weights_io import load_state_dict, match_state_dict
from ..errors import CheckpointError, ConfigError
from ..dictconfig import DictConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision architecture name -> (block kind, blocks per stage).
TORCHVISION_ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


@dataclass(frozen=True)
class ResNetConfig(DictConfig):
    """Shape of a :class:`ResNet`.

    Attributes:
        block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1; 4x expansion).
        layers: Blocks in each of the four stages, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: Size of the logits.
        stem: ``"imagenet"`` (torchvision layout) or ``"cifar"`` (pytorch-cifar layout).
        width: Stem channels; stage ``i`` has ``width * 2**i`` planes (64 in every published
            ResNet; smaller only for tiny test networks, e.g. the golden fixtures).
    """

    block: str = "bottleneck"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    num_classes: int = 1000
    stem: str = "imagenet"
    width: int = 64

    def __post_init__(self):
        if self.block not in _BLOCK_KINDS:
            raise ConfigError(f"block must be one of {sorted(_BLOCK_KINDS)}, got {self.block!r}")
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ConfigError(f"layers must be four positive counts, got {self.layers}")
        if self.stem not in ("imagenet", "cifar"):
            raise ConfigError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if self.width < 1:
            raise ConfigError(f"width must be a positive channel count, got {self.width}")
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))


def _projection(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN on the skip path when the block changes resolution or width, else None."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class _Block(nn.Module):
    """Residual block base: registers the skip projection under the layout's own name."""

    expansion = 1

    def _set_skip(self, c_in: int, planes: int, stride: int, skip_name: str) -> None:
        self._skip_name = skip_name
        self.add_module(skip_name, _projection(c_in, planes * self.expansion, stride))

    def _skip(self, x: Tensor) -> Tensor:
        projection = getattr(self, self._skip_name)
        return x if projection is None else projection(x)


class BasicBlock(_Block):
    """Two 3x3 conv-BN pairs; ``[B, c_in, H, W] -> [B, planes, H/stride, W/stride]``."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, skip_name: str = "downsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self._set_skip(c_in, planes, stride, skip_name)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self._skip(x))


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (strided), 1x1 expand; ``[B, c_in, H, W] -> [B, 4 planes, H/s, W/s]``."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, skip_name: str = "downsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self._set_skip(c_in, planes, stride, skip_name)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self._skip(x))


_BLOCK_KINDS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """A ResNet in torchvision's (``stem="imagenet"``) or pytorch-cifar's layout.

    No normalisation happens here: ``forward(x: [B, 3, H, W]) -> logits [B, num_classes]``
    sees ``x`` exactly as the published weights were trained to (ImageNet-normalised for
    torchvision's weights, raw [0, 1] for AutoAttack's CIFAR example). Use
    :class:`ImageNetResNet` for torchvision weights on [0, 1] images.
    """

    def __init__(self, config: ResNetConfig = ResNetConfig()):
        super().__init__()
        self.config = config
        imagenet, width = config.stem == "imagenet", config.width
        self.conv1 = (nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False) if imagenet
                      else nn.Conv2d(3, width, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()
        block, skip_name, c_in = _BLOCK_KINDS[config.block], ("downsample" if imagenet else "shortcut"), width
        for stage, (planes, count) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), config.layers)):
            blocks = []
            for i in range(count):
                blocks.append(block(c_in, planes, 2 if stage > 0 and i == 0 else 1, skip_name))
                c_in = planes * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self._head_name = "fc" if imagenet else "linear"
        self.add_module(self._head_name, nn.Linear(c_in, config.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return getattr(self, self._head_name)(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ImageNetResNet(ResNet):
    """A torchvision-layout ResNet that takes [0, 1] images and normalises them inside.

    ``forward(x: [B, 3, H, W] in [0, 1]) -> logits [B, num_classes]``. ``mean``/``std`` are
    non-persistent buffers, so ``state_dict()`` has exactly torchvision's unprefixed keys and
    a torchvision checkpoint loads into it strictly.
    """

    def __init__(self, config: ResNetConfig = ResNetConfig(), mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        if config.stem != "imagenet":
            raise ConfigError("ImageNetResNet needs stem='imagenet' (torchvision layout)")
        super().__init__(config)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward((x - self.mean) / self.std)


def torchvision_resnet(arch: str = "resnet50", num_classes: int = 1000) -> ImageNetResNet:
    """Build ``arch`` (a key of :data:`TORCHVISION_ARCHS`) in torchvision's layout, [0, 1] input."""
    if arch not in TORCHVISION_ARCHS:
        raise ConfigError(f"unknown torchvision ResNet {arch!r}; choose one of {sorted(TORCHVISION_ARCHS)}")
    block, layers = TORCHVISION_ARCHS[arch]
    return ImageNetResNet(ResNetConfig(block=block, layers=layers, num_classes=num_classes))


def autoattack_resnet18() -> ResNet:
    """The CIFAR-10 ResNet-18 of AutoAttack's example (pytorch-cifar layout, [0, 1] input)."""
    return ResNet(ResNetConfig(block="basic", layers=(2, 2, 2, 2), num_classes=10, stem="cifar"))


def prepare_state_dict(state: dict, module: nn.Module, source: str) -> dict[str, Tensor]:
    """Undo the usual packaging of published checkpoints before a strict match.

    Takes the ``"state_dict"`` entry of a training checkpoint, drops a ``module.`` or
    ``model.`` prefix shared by every key (DataParallel / wrapper models), and adds BatchNorm
    ``num_batches_tracked`` counters that pre-0.4 PyTorch files lack (unused in eval mode).

    Raises:
        CheckpointError: if, after unwrapping, some entry is not a tensor.
    """
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    for prefix in ("module.", "model."):
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    odd = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if odd:
        raise CheckpointError(f"{source} is not a state dict of tensors: entries {', '.join(odd[:5])} "
                              "are not tensors; pass the file that holds the model weights")
    state = dict(state)
    for key in module.state_dict():
        stem = key.removesuffix("num_batches_tracked")
        if stem != key and key not in state and stem + "running_mean" in state:
            state[key] = torch.zeros((), dtype=torch.long)
    return state


def load_into(module: nn.Module, path: str | Path, allow_pickle: bool = False) -> nn.Module:
    """Load a published checkpoint into ``module`` safely and strictly; return it in eval mode.

    Reads with :func:`ssni.weights_io.load_state_dict` (weights only unless
    ``allow_pickle``), applies :func:`prepare_state_dict`, then
    :func:`ssni.weights_io.match_state_dict`.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or does not fit ``module``.
    """
    state = prepare_state_dict(load_state_dict(Path(path), allow_pickle=allow_pickle), module, str(path))
    match_state_dict(module, state, str(path))
    return module.eval()


def load_torchvision_resnet(path: str | Path, arch: str = "resnet50", num_classes: int = 1000,
                            allow_pickle: bool = False) -> ImageNetResNet:
    """Load torchvision-layout weights (e.g. ``resnet50-0676ba61.pth``) into an :class:`ImageNetResNet`.

    The returned model takes [0, 1] images ``[B, 3, H, W]`` and returns ``[B, num_classes]`` logits.
    """
    return load_into(torchvision_resnet(arch, num_classes), path, allow_pickle)


def find_autoattack_checkpoint() -> Path | None:
    """Where an installed ``pyautoattack`` keeps ``examples/model_test.pt``, or None.

    Uses :func:`importlib.util.find_spec`, which locates the package without importing it.
    """
    spec = importlib.util.find_spec("pyautoattack")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "examples" / "model_test.pt"
        if candidate.is_file():
            return candidate
    return None


def load_autoattack_resnet18(path: str | Path | None = None) -> ResNet:
    """Load AutoAttack's example CIFAR-10 ResNet-18 (``model_test.pt``); input [0, 1] images.

    Args:
        path: The file; by default the copy inside an installed ``pyautoattack``.

    Returns:
        The model in eval mode: ``[B, 3, 32, 32] in [0, 1] -> [B, 10]`` logits.

    Raises:
        CheckpointError: no path given and no ``pyautoattack`` found, or the file does not fit.
    """
    if path is None:
        path = find_autoattack_checkpoint()
        if path is None:
            raise CheckpointError("no path given and pyautoattack's examples/model_test.pt was not found; "
                                  "pass the path of model_test.pt")
    return load_into(autoattack_resnet18(), path)


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "TORCHVISION_ARCHS", "BasicBlock", "Bottleneck", "ImageNetResNet",
    "ResNet", "ResNetConfig", "autoattack_resnet18", "find_autoattack_checkpoint", "load_autoattack_resnet18",
    "load_into", "load_torchvision_resnet", "prepare_state_dict", "torchvision_resnet",
]
