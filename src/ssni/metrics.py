"""Accuracy with binomial confidence intervals, and the AUROC of a detection score."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion ``correct / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# The convergence rule (``ssni converge`` and ``--sanity``'s 2x-budget checks). Both budgets of a
# comparison are measured on the same samples, so it is paired: a sample robust at the smaller budget
# and broken at the larger one is a discordant pair "lost", the reverse "gained".
ALPHA = 0.05  # level of the one-sided exact sign test on the discordant pairs
TOLERANCE = 0.05  # robust accuracy (share of all samples) a budget may keep above the largest one measured
MIN_ATTACKED = 10  # clean-correct (hence attacked) samples without which there is no "converged" verdict


@dataclass(frozen=True)
class BudgetMove:
    """Robust samples at a budget (``base``) and at a larger one (``other``), of ``n``; ``lost`` and
    ``gained`` are the discordant pairs. ``paired`` is False when only the counts were known: then the
    fewest discordant pairs the counts allow are assumed (``|base - other|``, all one way), which gives
    the smallest p-value, so a count-only verdict errs towards "not converged"."""

    base: int
    other: int
    lost: int
    gained: int
    n: int
    paired: bool

    @property
    def p_drop(self) -> float:
        """One-sided p-value of "the larger budget breaks more samples" (exact sign test)."""
        return sign_test(self.lost, self.gained)

    @property
    def p_rise(self) -> float:
        """One-sided p-value of "the larger budget breaks fewer samples" (masking or noise)."""
        return sign_test(self.gained, self.lost)


def sign_test(k: int, other: int) -> float:
    """P(X >= k) for X ~ Binomial(k + other, 1/2): McNemar's exact test on ``k`` discordant pairs one
    way and ``other`` the other way (1.0 when there are none)."""
    d = k + other
    return sum(math.comb(d, j) for j in range(k, d + 1)) / 2**d


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value on ``a_only`` and ``b_only`` discordant pairs: twice the smaller
    tail of ``Binomial(a_only + b_only, 1/2)``, at most 1."""
    return min(1.0, 2 * sign_test(max(a_only, b_only), min(a_only, b_only)))


def budget_move(base: int, other: int, n: int, base_ids=None, other_ids=None) -> BudgetMove:
    """The move between two budgets: from the robust samples' ids when both are given (``base`` and
    ``other`` are then their sizes), else from the counts alone (see :class:`BudgetMove`)."""
    if base_ids is None or other_ids is None:
        return BudgetMove(base, other, max(base - other, 0), max(other - base, 0), n, paired=False)
    b, o = set(base_ids), set(other_ids)
    return BudgetMove(len(b), len(o), len(b - o), len(o - b), n, paired=True)


def dropped_beyond(move: BudgetMove, alpha: float = ALPHA, tolerance: float | None = TOLERANCE) -> bool:
    """Did the larger budget lower robust accuracy: a significant sign test on the discordant pairs
    (``p_drop < alpha``), or (``tolerance`` given) more than ``tolerance * n`` samples fewer?"""
    beyond = tolerance is not None and move.base - move.other > tolerance * move.n
    return move.p_drop < alpha or beyond


def describe_move(move: BudgetMove) -> str:
    """``"16 -> 12 of 32 (lost 4, gained 0; p 0.062)"``; ``counts only`` when not paired."""
    pairs = f"lost {move.lost}, gained {move.gained}" if move.paired else "counts only"
    return f"{move.base} -> {move.other} of {move.n} ({pairs}; p {move.p_drop:.3g})"


def auroc(negatives: Tensor, positives: Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    neg, pos = negatives.double().flatten(), positives.double().flatten()
    if neg.numel() == 0 or pos.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return ((greater + 0.5 * ties) / (neg.numel() * pos.numel())).item()
