"""Score norms: how far an input lies from the clean data (SSNI, METHOD §2).

The expected perturbation score (EPS; Zhang et al., ICML 2023) averages the
score of the diffusion model over the ``N`` smallest noise levels, each at a
freshly perturbed copy of the input:

    EPS(x) = (1/N) sum_{k=1..N} score(sqrt(abar_k) x~ + sqrt(1 - abar_k) z_k, k),
    e(x)   = || EPS(x) ||_2   (over all pixels and channels, after averaging)

with ``x~ = 2 x - 1`` and ``score = -eps_theta / sqrt(1 - abar_k)``. All ``N``
levels go through the network in one batched pass of ``N * B`` rows (split in
chunks of ``max_rows`` to bound memory). The function is differentiable; wrap
the call in ``torch.no_grad()`` (or use :func:`score_norm_nograd`) when no
gradient is needed. With ``checkpoint=True`` and gradients on, each chunk (one
level's ``B`` rows unless ``max_rows`` says otherwise) keeps only its input for
the backward pass and is recomputed there, one chunk at a time: the pass then
holds about one reverse step's activations instead of ``N`` of them per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from .denoisers.protocol import EpsModel, eps_to_score
from .diffusion import VPSchedule, forward_jump, to_model_scale, trusted_levels, with_trusted_levels
from .rng import SampleNoise

NOISE_KEY = "score-norm"


def score_norm(model: EpsModel, schedule: VPSchedule, x: Tensor, noise: SampleNoise,
               n_levels: int = 20, max_rows: int | None = None, checkpoint: bool = False) -> Tensor:
    """``e(x)`` for ``x: [B, C, H, W]`` in ``[0, 1]`` -> ``[B]`` (differentiable).

    Args:
        model: epsilon network in the project protocol.
        schedule: the VP schedule the model was trained with.
        x: images in ``[0, 1]``.
        noise: per-sample noise streams; level ``k`` uses key ``(NOISE_KEY, k)``.
        n_levels: ``N``, the number of smallest levels averaged (20 on CIFAR-10, 50 on ImageNet).
        max_rows: largest number of rows per network call (default: all ``N * B`` at once, or ``B``
            with ``checkpoint``).
        checkpoint: activation checkpointing of each network call when gradients are on (same
            value and gradient; one more forward pass in the backward, far less memory).
    """
    batch = x.shape[0]
    x_model = to_model_scale(x)
    levels = torch.arange(1, n_levels + 1, device=x.device).repeat_interleave(batch)  # level-major
    z = torch.cat([noise.randn((NOISE_KEY, k), x_model) for k in range(1, n_levels + 1)])
    x_t = forward_jump(schedule, x_model.repeat(n_levels, 1, 1, 1), levels, z)
    recompute = checkpoint and torch.is_grad_enabled()
    rows = max_rows or (batch if recompute else x_t.shape[0])

    def call(chunk: Tensor, chunk_levels: Tensor) -> Tensor:  # levels 1..N: valid by construction
        if recompute:
            return recompute_in_backward(with_trusted_levels(model), chunk, chunk_levels, use_reentrant=False)
        with trusted_levels():
            return model(chunk, chunk_levels)

    # the average and norm in float32 even under bf16 autocast: N levels' scores nearly cancel in the mean
    eps = torch.cat([call(x_t[i:i + rows], levels[i:i + rows]) for i in range(0, x_t.shape[0], rows)]).float()
    expected_score = eps_to_score(schedule, levels, eps).reshape(n_levels, batch, *x.shape[1:]).mean(0)
    return expected_score.flatten(1).norm(dim=1)


@torch.inference_mode()
def score_norm_nograd(model: EpsModel, schedule: VPSchedule, x: Tensor, noise: SampleNoise,
                      n_levels: int = 20, max_rows: int | None = None) -> Tensor:
    """The same value as :func:`score_norm`, under ``inference_mode`` (no graph, less memory)."""
    return score_norm(model, schedule, x, noise, n_levels, max_rows)


def dataset_score_norms(model: EpsModel, schedule: VPSchedule, images: Tensor, ids: Tensor, seed: int,
                        n_levels: int = 20, batch_size: int = 250, max_rows: int | None = None) -> Tensor:
    """Score norms ``[N]`` of a whole image set, sample ``i`` seeded by ``(seed, ids[i])``; ``max_rows``
    caps the rows per network call (default: ``n_levels x batch_size``)."""
    if len(images) == 0:
        return torch.zeros(0)
    return torch.cat([score_norm_nograd(model, schedule, images[i:i + batch_size],
                                        SampleNoise.from_ids(seed, ids[i:i + batch_size]), n_levels, max_rows)
                      for i in range(0, len(images), batch_size)])
