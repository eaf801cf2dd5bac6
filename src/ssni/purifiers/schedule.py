"""The one place that batches reverse chains of samples at different levels.

Sample ``i`` walks its own descending grid of levels ``t_i = g_0 > g_1 > ... > 0``.
The authors' construction (METHOD §3) gives every sample a grid of common
length ``n``: the levels ``ceil(k t_i / n)`` for ``k = 1..n`` (computed here in
exact integer arithmetic), plus level 0. When ``t_i < n`` the grid repeats
levels, and a step between equal levels is an exact no-op.

:func:`run_join_when_due` drops the repeats, so sample ``i`` takes
``m_i = min(n, t_i)`` real steps; samples join the batch when their remaining
steps equal the ticks left (all finish together), so a batch costs
``sum_i m_i`` network evaluations in ``max_i m_i`` calls.
:func:`run_common_length` is the authors' scheme (``B * n`` evaluations), kept as
the reference path for tests and benchmarks; both give the same output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# step(x_a [b,...], a [b], c [b], idx [b]) -> x_c [b,...]; idx are the rows' positions in the batch.
StepFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def common_grid(t: int, n: int | None) -> list[int]:
    """Descending levels ``[t, ..., 0]`` of one sample, repeats kept (length ``n + 1``).

    ``n=None`` means unit steps (full DDPM): ``[t, t-1, ..., 0]``.
    """
    if n is None:
        return list(range(t, -1, -1))
    return [-(-t * k // n) for k in range(n, 0, -1)] + [0]


def unique_grid(t: int, n: int | None) -> list[int]:
    """:func:`common_grid` without repeated levels: ``min(n, t) + 1`` entries."""
    return sorted(set(common_grid(t, n)), reverse=True)


def _apply(step: StepFn, x: Tensor, a: Tensor, c: Tensor, idx: Tensor, use_checkpoint: bool) -> Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(step, x, a, c, idx, use_reentrant=False)
    return step(x, a, c, idx)


def run_join_when_due(x: Tensor, grids: list[list[int]], step: StepFn, use_checkpoint: bool = False) -> Tensor:
    """Run every sample's grid (no repeats) in ``max_i m_i`` batched calls.

    Args:
        x: ``[B, ...]`` states at each sample's first grid level.
        grids: per-sample descending levels without repeats, each ending at 0.
        step: the reverse step rule (see :data:`StepFn`); it must not use ``no_grad``.
        use_checkpoint: recompute each step in the backward pass (activation
            checkpointing) so memory does not grow with the number of steps.
    """
    n_steps = [len(g) - 1 for g in grids]
    ticks = max(n_steps, default=0)
    for tick in range(ticks):
        rows = [i for i, m in enumerate(n_steps) if tick >= ticks - m]
        pos = [tick - (ticks - n_steps[i]) for i in rows]
        idx = torch.tensor(rows, device=x.device)
        a = torch.tensor([grids[i][p] for i, p in zip(rows, pos)], device=x.device)
        c = torch.tensor([grids[i][p + 1] for i, p in zip(rows, pos)], device=x.device)
        x = x.index_copy(0, idx, _apply(step, x[idx], a, c, idx, use_checkpoint))
    return x


def run_common_length(x: Tensor, grids: list[list[int]], step: StepFn, use_checkpoint: bool = False) -> Tensor:
    """The authors' scheme: all ``B`` rows every step, no-op steps masked out (``B * n`` evaluations)."""
    if not grids:
        return x
    idx = torch.arange(x.shape[0], device=x.device)
    for k in range(len(grids[0]) - 1):
        a = torch.tensor([g[k] for g in grids], device=x.device)
        c = torch.tensor([g[k + 1] for g in grids], device=x.device)
        moved = _apply(step, x, a.clamp_min(1), c, idx, use_checkpoint)
        keep = (a == c).reshape(-1, *([1] * (x.dim() - 1)))
        x = torch.where(keep, x, moved)
    return x
