"""A small CNN for 28x28 (or 32x32) digits, normalisation inside the model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from ..dictconfig import DictConfig


@dataclass(frozen=True)
class SmallCNNConfig(DictConfig):
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    mean: float = 0.1307
    std: float = 0.3081


class SmallCNN(nn.Module):
    """Two conv stages (``width``, ``2 width`` channels) and a two-layer head.

    ``forward(x: [B, C, H, W] in [0, 1]) -> logits [B, num_classes]``.
    """

    def __init__(self, config: SmallCNNConfig = SmallCNNConfig()):
        super().__init__()
        self.config = config
        w = config.width

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(config.in_channels, w), stage(w, 2 * w))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.3),
            nn.Linear(2 * w * 16, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, config.num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.config.mean) / self.config.std
        return self.head(self.features(x))


__all__ = ["SmallCNN", "SmallCNNConfig"]
