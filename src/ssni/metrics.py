"""Accuracy with binomial confidence intervals, and the AUROC of a detection score."""

from __future__ import annotations

import math

from torch import Tensor


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ``correct / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def changed_beyond_noise(base: int, other: int, n: int) -> tuple[bool, float]:
    """Did an accuracy move from ``base / n`` to ``other / n`` by at least the half-width of ``base``'s
    95% Wilson interval? Returns the verdict and that half-width (as a fraction). This is the one
    convergence criterion: the budget ladder (``ssni converge``) and ``--sanity`` both use it."""
    low, high = wilson_interval(base, n)
    half = (high - low) / 2
    return abs(other - base) / n >= half, half


def auroc(negatives: Tensor, positives: Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    neg, pos = negatives.double().flatten(), positives.double().flatten()
    if neg.numel() == 0 or pos.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return ((greater + 0.5 * ties) / (neg.numel() * pos.numel())).item()
