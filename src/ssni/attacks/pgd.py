"""PGD with EOT (Madry et al., 2018; Athalye et al., 2018) on any ``nn.Module``.

The loss gradient is averaged over ``eot`` forward/backward passes, each with a
fresh draw of the model's randomness (a :class:`ssni.Defense` advances its draw
counter on every call), and flows exactly through the whole defense: the
classifier, every reverse step, the forward jump and, with SSNI, the score norm
and the relaxed levels. The last iterate is returned, as in the paper's protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import ConfigError
from ..validation import check_images
from .base import ThreatModel


def call_model(model: nn.Module, x: Tensor, sample_ids: Tensor | None) -> Tensor:
    """Logits of ``model``; sample ids reach models that take them (``takes_sample_ids``)."""
    return model(x, sample_ids=sample_ids) if getattr(model, "takes_sample_ids", False) else model(x)


@dataclass
class PGD:
    """Projected gradient ascent on the cross-entropy.

    Attributes:
        threat: the l_p ball.
        steps: iterations (paper: 200).
        step_size: per-step move, in the norm of the ball (paper: 0.007 on CIFAR-10).
        eot: gradient samples averaged per step (paper: 20).
        random_start: start at a random point of the ball (paper: no).
        sign_step: move along the gradient's sign for l_2 too (the paper's code does; off by
            default, where l_2 steps follow the normalised gradient).
        seed: seed of the random start.
    """

    threat: ThreatModel = field(default_factory=ThreatModel)
    steps: int = 10
    step_size: float = 0.05
    eot: int = 1
    random_start: bool = False
    sign_step: bool = False
    seed: int = 0
    progress: bool = False
    loss_trace: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.steps < 0 or self.eot < 1 or self.step_size <= 0:
            raise ConfigError("PGD needs steps >= 0, eot >= 1 and step_size > 0")

    def objective(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None) -> Tensor:
        """The loss PGD ascends, summed over the batch (cross-entropy on the logits)."""
        return F.cross_entropy(call_model(model, x, sample_ids), y, reduction="sum")

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None) -> tuple[Tensor, float]:
        """EOT estimate of the input gradient of the objective, and the mean loss."""
        total, loss_sum = torch.zeros_like(x), 0.0
        for _ in range(self.eot):
            x_var = x.detach().requires_grad_(True)
            loss = self.objective(model, x_var, y, sample_ids)
            total += torch.autograd.grad(loss, x_var)[0]
            loss_sum += loss.item()
        return total / self.eot, loss_sum / (self.eot * x.shape[0])

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        check_images(x)
        x = x.detach()
        x_adv = self.threat.random_point(x, torch.Generator().manual_seed(self.seed)) if self.random_start else x
        self.loss_trace = []
        for _ in tqdm(range(self.steps), desc="PGD", leave=False, disable=not self.progress):
            grad, loss = self.gradient(model, x_adv, y, sample_ids)
            self.loss_trace.append(loss)
            direction = grad.sign() if self.sign_step else self.threat.ascent_direction(grad)
            x_adv = self.threat.project(x_adv + self.step_size * direction, x)
        return x_adv.detach()
