"""``Defense``: image -> score norm -> t* -> purify -> classify -> logits, one ``nn.Module``.

Attacks see one differentiable model. Gradients flow through the classifier,
every reverse step, the forward jump and, with SSNI, the score norm and the
reweighting (reverse steps and score-norm calls are activation-checkpointed when
the purifier's ``checkpoint`` is on). The one step that is not differentiated
as computed is the level: its forward value is the integer ``t``, and its
gradient is a straight-through relaxation, the derivative of the continuous
twin ``abar(t_relaxed)`` standing in for the rounding's in the forward jump
(:func:`ssni.diffusion.forward_jump`); the reverse grid follows the integer
level and carries no gradient. So ``gradient = "exact"`` means exact through
the classifier, the reverse steps, the jump and the score norm, with this
relaxation at the level. Set ``ssni.differentiable = False`` to treat the
levels as constants (the paper's attacks recompute them without gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .diffusion import VPSchedule, trusted_levels
from .denoisers.protocol import EpsModel
from .errors import ConfigError, InputError
from .purifiers.base import Purifier
from .reweight import Reweight
from .rng import SampleNoise, batch_ids
from .score_norm import score_norm
from .validation import check_images, trusted_images


def resize(x: Tensor, size: int | None) -> Tensor:
    """Bilinear resize of square images to ``size`` (differentiable; a no-op when already that size)."""
    if size is None or x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


@dataclass
class Levels:
    """What SSNI decided for a batch: ``t: [R, B]`` integer levels, ``t_relaxed`` (or ``None``),
    ``score_norm: [B]`` (or ``None`` without SSNI), and the reverse plan; ``constant``: the base
    method's ``t*`` (the purifier knows them on the host, so its grids need no read)."""

    t: Tensor
    t_relaxed: Tensor | None
    score_norm: Tensor | None
    start: Tensor
    extra_steps: int
    constant: bool = False


class SSNI(nn.Module):
    """Sample-specific levels from score norms.

    Args:
        score_model: epsilon network used for the score norm (usually the purifier's).
        reweight: :class:`ssni.reweight.Reweight` (SSNI-N, SSNI-L or a user callable).
        schedule: VP schedule of ``score_model``.
        n_levels: ``N`` smallest levels averaged in the EPS (20 on CIFAR-10, 50 on ImageNet).
        differentiable: let the gradient reach the score norm (adaptive attacks).
    """

    def __init__(self, score_model: EpsModel, reweight: Reweight, schedule: VPSchedule = VPSchedule(),
                 n_levels: int = 20, differentiable: bool = True):
        super().__init__()
        if n_levels < 1:
            raise ConfigError(f"n_levels must be >= 1, found {n_levels}")
        self.score_model, self.reweight, self.schedule = score_model, reweight, schedule
        self.n_levels, self.differentiable = n_levels, differentiable

    def forward(self, x: Tensor, t_stars: tuple[int, ...], noise: SampleNoise, max_rows: int | None = None,
                checkpoint: bool = False) -> Levels:
        """Levels ``[R, B]`` for the rounds' ``t_stars``; ``max_rows`` caps the score-norm pass's calls and
        ``checkpoint`` recomputes them in the backward pass (:func:`ssni.score_norm.score_norm`)."""
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            e = score_norm(self.score_model, self.schedule, x, noise, self.n_levels, max_rows, checkpoint)
        pairs = [self.reweight.levels(e, t_star, self.schedule.num_levels) for t_star in t_stars]
        t = torch.stack([p[0] for p in pairs])
        t_relaxed = torch.stack([p[1] for p in pairs]) if e.requires_grad else None
        start, extra = self.reweight.reverse_plan(t)
        return Levels(t, t_relaxed, e, start.clamp_max(self.schedule.num_levels), extra)


class Defense(nn.Module):
    """Classifier protected by a purifier, with optional SSNI levels.

    ``defense(x)`` returns logits for ``x: [B, C, H, W]`` in ``[0, 1]``, averaged over
    ``votes`` independent purifications (differentiable); :meth:`predict` takes the
    majority vote of their labels instead (GNS's classification rule).

    Randomness: sample ``i`` of a call is purified with seeds derived from
    ``(seed, sample_ids[i], draw)``. ``sample_ids`` defaults to positions
    ``0..B-1``; ``draw`` defaults to a counter that advances on every call, so
    repeated calls (EOT) see fresh randomness and a fixed ``draw`` reproduces one.
    """

    takes_sample_ids = True

    def __init__(self, classifier: nn.Module, purifier: Purifier, ssni: SSNI | None = None,
                 seed: int = 0, votes: int = 1, resolution: int | None = None, image_size: int | None = None,
                 max_rows: int | None = None):
        super().__init__()
        if votes < 1:
            raise ConfigError(f"votes must be >= 1, found {votes}")
        self.classifier, self.purifier, self.ssni = classifier, purifier, ssni
        self.resolution, self.image_size = resolution, image_size
        self.max_rows = max_rows  # most rows per score-norm call (default: all N x B in one)
        self.seed, self.votes, self.draw = seed, votes, 0
        if isinstance(purifier.model, nn.Module):
            self.denoiser = purifier.model  # registered so .eval()/.to() reach it
        first_conv = next((m for m in self.modules() if isinstance(m, nn.Conv2d)), None)
        self.in_channels = None if first_conv is None else first_conv.in_channels

    def check_input(self, x: Tensor) -> Tensor:
        """``x`` checked against what the networks take: channels, and the size when known (``image_size``,
        else the size a named classifier was trained at, see :func:`ssni.checkpoints.registry.load_named`).
        Other float types (float64, float16, bfloat16) are converted to the classifier's, the only
        conversion made (a reduced precision inside the networks is ``evaluate.precision``'s choice).
        The values (finite, in ``[0, 1]``) are read back once; not inside an attack, which checks its
        images once and runs its passes inside :func:`ssni.validation.trusted_images`."""
        size = self.image_size or getattr(self.classifier, "image_size", None)
        weight = next((p for p in self.classifier.parameters() if p.is_floating_point()), None)
        if isinstance(x, Tensor) and weight is not None and x.device != weight.device:
            raise InputError(f"the images are on {x.device} and the defense's networks on {weight.device}; "
                             f"move one of them (images.to('{weight.device}') or defense.to('{x.device}'))")
        x = check_images(x, self.in_channels, None if size is None else (size, size))
        dtype = torch.float32 if weight is None else weight.dtype
        return x.to(dtype) if x.dtype != dtype else x

    def _noise(self, x: Tensor, sample_ids: Tensor | None, draw: int | Tensor | None, vote: int) -> SampleNoise:
        ids = batch_ids(x, sample_ids)
        if ids.shape != (x.shape[0],):
            raise ConfigError(f"sample_ids must be [B] = [{x.shape[0]}], found {tuple(ids.shape)}")
        if draw is None:
            draw = self.reserve_draws(1)
        if isinstance(draw, Tensor):  # one draw per row: several draws of a sample in one batch (EOT)
            draw = draw.to(ids.device).long()  # seeds are derived on the ids' device: no host round trip
        return SampleNoise.from_ids(self.seed, ids, draw * self.votes + vote)

    def reserve_draws(self, count: int) -> int:
        """Take ``count`` fresh draws from the counter; return the first (``draw=None`` takes one)."""
        first, self.draw = self.draw, self.draw + count
        return first

    def levels(self, x: Tensor, noise: SampleNoise, max_rows: int | None = None) -> Levels:
        """The levels each sample gets: SSNI's, or the base method's constant ``t*``."""
        if self.ssni is None:
            t = self.purifier.default_levels(x.shape[0], x.device)
            return Levels(t, None, None, t, 0, constant=True)
        return self.ssni(x, self.purifier.t_stars, noise, max_rows, self.purifier.checkpoint)

    def purify(self, x: Tensor, sample_ids: Tensor | None = None, draw: int | Tensor | None = None,
               vote: int = 0, width: int | None = None) -> tuple[Tensor, Levels]:
        """Purified images and the levels used, for one draw of the randomness.

        ``width`` caps the rows per network call, in the score-norm pass and in purification
        (continuous batching; see :meth:`ssni.purifiers.base.Purifier.purify`); results do not
        depend on it.

        The images are checked here (:meth:`check_input`), once: the purifier runs inside
        :func:`ssni.validation.trusted_images` and :func:`ssni.diffusion.trusted_levels` (the levels
        come from SSNI or the purifier, in ``1..T`` by construction), so its own checks read nothing
        back; with SSNI the reverse grids read the levels once.
        """
        x = self.check_input(x)
        noise = self._noise(x, sample_ids, draw, vote)
        x_diffusion = resize(x, self.resolution)
        lv = self.levels(x_diffusion, noise, width or self.max_rows)
        t, start = (None, None) if lv.constant else (lv.t, lv.start)
        with trusted_images(), trusted_levels():
            out = self.purifier.purify(x_diffusion, t, noise, t_relaxed=lv.t_relaxed, start=start,
                                       extra_steps=lv.extra_steps, width=width)
        return resize(out, x.shape[-1]), lv

    def _all_votes(self, x: Tensor, sample_ids: Tensor | None,
                   draw: int | Tensor | None) -> list[tuple[Tensor, Levels]]:
        """``(logits, levels)`` of every vote of one draw."""
        if draw is None:
            draw = self.reserve_draws(1)
        x = self.check_input(x)
        with trusted_images():  # checked once for all votes
            purified = [self.purify(x, sample_ids, draw, v) for v in range(self.votes)]
        return [(self.classifier(out), lv) for out, lv in purified]

    def forward(self, x: Tensor, sample_ids: Tensor | None = None, draw: int | Tensor | None = None,
                return_score_norm: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """Logits averaged over votes; ``draw`` may be ``[B]`` (one draw per row, e.g. batched EOT).

        ``return_score_norm=True`` returns ``(logits, e)`` with ``e: [B]`` the score norm this very
        pass computed to set the levels (mean over votes; ``None`` without SSNI): attacks that
        constrain ``e(x)`` reuse it instead of running a second score-norm pass."""
        votes = self._all_votes(x, sample_ids, draw)
        logits = torch.stack([z for z, _ in votes]).mean(0)
        if not return_score_norm:
            return logits
        norms = [lv.score_norm for _, lv in votes]
        return logits, None if norms[0] is None else torch.stack(norms).mean(0)

    def predict(self, x: Tensor, sample_ids: Tensor | None = None, draw: int | None = None) -> Tensor:
        """Majority vote of the ``votes`` purifications' labels (ties go to the lower class)."""
        labels = torch.stack([logits.argmax(1) for logits, _ in self._all_votes(x, sample_ids, draw)])
        n_classes = int(labels.max()) + 1
        return torch.nn.functional.one_hot(labels, n_classes).sum(0).argmax(1)

    @torch.no_grad()
    def explain(self, x: Tensor, sample_ids: Tensor | None = None, draw: int | None = None) -> dict[str, Tensor]:
        """Score norms ``[B]`` (SSNI only) and levels ``[R, B]`` this defense would use."""
        x = self.check_input(x)
        lv = self.levels(resize(x, self.resolution), self._noise(x, sample_ids, draw, 0))
        return {"score_norm": lv.score_norm, "t_star": lv.t}
