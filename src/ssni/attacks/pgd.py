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

from ..errors import ConfigError
from ..progress import tqdm
from ..rng import SampleNoise, batch_ids
from ..validation import check_images, trusted_images
from .base import ThreatModel


def call_model(model: nn.Module, x: Tensor, sample_ids: Tensor | None, draw: Tensor | None = None) -> Tensor:
    """Logits of ``model``; sample ids (and per-row draws) reach models that take them."""
    if not getattr(model, "takes_sample_ids", False):
        return model(x)
    return model(x, sample_ids=sample_ids) if draw is None else model(x, sample_ids=sample_ids, draw=draw)


def trace_values(trace: list) -> list[float]:
    """A loss trace of 0-d tensors as floats, in one read back to the host."""
    tensors = [v for v in trace if isinstance(v, Tensor)]
    if len(tensors) != len(trace) or not trace:
        return [float(v) for v in trace]
    return torch.stack(tensors).tolist()


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
        seed: run seed; the random start of sample ``i`` is keyed by ``(seed, sample id)``, so it
            does not depend on the batch (or shard) the sample is in.
        eot_batch: EOT draws stacked into one forward/backward pass (rows ``eot_batch * B``) for
            models with per-row draws (:class:`ssni.defense.Defense`); same gradient as one draw
            per pass, fuller network calls, more memory.
    """

    threat: ThreatModel = field(default_factory=ThreatModel)
    steps: int = 10
    step_size: float = 0.05
    eot: int = 1
    random_start: bool = False
    sign_step: bool = False
    seed: int = 0
    eot_batch: int = 1
    progress: bool = False
    loss_trace: list[float] = field(default_factory=list, repr=False)
    fooled_any_iterate: Tensor | None = field(default=None, repr=False)
    sample_loss: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.steps < 0 or self.eot < 1 or self.step_size <= 0 or self.eot_batch < 1:
            raise ConfigError("PGD needs steps >= 0, eot >= 1, eot_batch >= 1 and step_size > 0")

    def objective(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None,
                  draw: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loss summed over the batch, logits)``: the cross-entropy PGD ascends, and what it saw.

        A subclass may return the ``[rows]`` per-row losses instead of their sum: :meth:`gradient`
        then ascends their sum and leaves each sample's mean over the draws in ``sample_loss``."""
        logits = call_model(model, x, sample_ids, draw)
        return F.cross_entropy(logits, y, reduction="sum"), logits

    def gradient(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None,
                 first_draw: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """EOT estimate of the input gradient of the objective, the mean loss (a 0-d tensor, read on
        the host once per attack, in :func:`trace_values`), and ``[B]`` whether one of these draws
        misclassified the sample.

        The ``eot`` draws are fresh ones from the model's counter, or ``first_draw, first_draw + 1,
        ...`` when given (the counter is then left alone)."""
        total, loss_sum, rows = torch.zeros_like(x), torch.zeros((), device=x.device), []
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        stackable = hasattr(model, "reserve_draws")
        ids = batch_ids(x, sample_ids)  # on the device the caller keeps them: the seeds are derived there
        for start in range(0, self.eot, self.eot_batch if stackable else 1):
            k = min(self.eot_batch, self.eot - start) if stackable else 1
            x_var = x.detach().requires_grad_(True)
            if stackable:  # k draws of every sample as one batch: row j * B + i is draw first + j of sample i
                first = model.reserve_draws(k) if first_draw is None else first_draw + start
                draws = first + torch.arange(k, device=ids.device).repeat_interleave(x.shape[0])
                loss, logits = self.objective(model, x_var.repeat(k, *([1] * (x.dim() - 1))), y.repeat(k),
                                              ids.repeat(k), draws)
            else:
                loss, logits = self.objective(model, x_var, y, sample_ids,
                                              None if first_draw is None else first_draw + start)
            if loss.dim() == 1:  # per-row losses, row j * B + i: keep each sample's mean over the draws
                rows.append(loss.detach().reshape(k, -1))
                loss = loss.sum()
            fooled |= (logits.detach().argmax(1) != y.repeat(k)).reshape(k, -1).any(0)
            total += torch.autograd.grad(loss, x_var)[0]
            loss_sum = loss_sum + loss.detach().float()  # a tensor: no host read per pass
        self.sample_loss = torch.cat(rows).mean(0) if rows else None
        return total / self.eot, loss_sum / (self.eot * x.shape[0]), fooled

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        check_images(x)
        x = x.detach()
        ids = batch_ids(x, sample_ids)
        x_adv = self.threat.random_point(x, SampleNoise.from_ids(self.seed, ids)) if self.random_start else x
        self.loss_trace = []
        self.fooled_any_iterate = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        with trusted_images():  # x is checked; iterates are projected into [0, 1]: no per-pass read
            for _ in tqdm(range(self.steps), desc="PGD", leave=False, disable=not self.progress):
                grad, loss, fooled = self.gradient(model, x_adv, y, ids)
                self.loss_trace.append(loss)
                self.fooled_any_iterate |= fooled
                direction = grad.sign() if self.sign_step else self.threat.ascent_direction(grad)
                x_adv = self.threat.project(x_adv + self.step_size * direction, x)
        self.loss_trace = trace_values(self.loss_trace)
        return x_adv.detach()
