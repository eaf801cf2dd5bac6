"""The one place that batches reverse chains of samples at different levels.

Sample ``i`` walks its own descending grid of levels ``t_i = g_0 > g_1 > ... > 0``.
The authors' construction (METHOD §3) gives every sample a grid of common
length ``n``: the levels ``ceil(k t_i / n)`` for ``k = 1..n`` (computed here in
exact integer arithmetic), plus level 0. When ``t_i < n`` the grid repeats
levels, and a step between equal levels is an exact no-op.

:func:`run_join_when_due` drops the repeats, so sample ``i`` takes
``m_i = min(n, t_i)`` real steps and a batch costs ``sum_i m_i`` network
evaluations in ``max_i m_i`` calls. Given a ``width`` below the batch size it
keeps calls full by continuous batching: a finished sample's row goes to the
next one waiting, which brings a large set of images to the cost floor
(``sum_i m_i`` evaluations at full width).
:func:`run_common_length` is the authors' scheme (``B * n`` evaluations), kept as
the reference path for tests and benchmarks; both give the same output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..diffusion import trusted_levels, with_trusted_levels

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
    """One step on levels the caller has checked (recomputed in the backward pass when checkpointed)."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(with_trusted_levels(step), x, a, c, idx, use_reentrant=False)
    with trusted_levels():
        return step(x, a, c, idx)


def join_plan(grids: list[list[int]], width: int | None = None) -> list[tuple[list[int], list[int], list[int]]]:
    """The calls :func:`run_join_when_due` makes: per call, its rows and their levels ``a -> c``.

    Rows keep the order in which samples entered (longest chain first): a network's output
    for a row can change in its last bits with the row's position in the batch, so this
    order is part of what makes results reproducible.

    Pure host bookkeeping, done once per purification so the loop over calls issues no
    host-to-device copies (each would stall an accelerator's queue) and no syncs.
    """
    waiting = sorted((i for i, g in enumerate(grids) if len(g) > 1), key=lambda i: len(grids[i]), reverse=True)
    if width is not None and width < 1:
        raise ValueError(f"width must be at least 1, found {width}")
    width = len(waiting) if width is None else width
    active, position = waiting[:width], {i: 0 for i in waiting[:width]}
    waiting, plan = waiting[width:], []
    while active:
        plan.append((list(active), [grids[i][position[i]] for i in active],
                     [grids[i][position[i] + 1] for i in active]))
        for i in active:
            position[i] += 1
        active = [i for i in active if position[i] < len(grids[i]) - 1]
        while waiting and len(active) < width:
            active.append(waiting.pop(0))
            position[active[-1]] = 0
    return plan


def run_join_when_due(x: Tensor, grids: list[list[int]], step: StepFn, use_checkpoint: bool = False,
                      width: int | None = None) -> Tensor:
    """Run every sample's grid (no repeats), at most ``width`` rows per network call.

    Sample ``i`` takes ``m_i = len(grids[i]) - 1`` steps. Samples enter longest chain first;
    whenever one finishes, the next waiting sample takes its row (continuous batching), so
    calls stay full until the queue drains. With ``width >= B`` (the default) every sample
    starts at once: ``max_i m_i`` calls, ``sum_i m_i`` evaluations.

    Host work per call is a few tensor slices: the rows and levels of every call go to the
    device in one copy (:func:`join_plan`), and a call on the whole batch skips the gather
    and scatter.

    Args:
        x: ``[B, ...]`` states at each sample's first grid level.
        grids: per-sample descending levels without repeats, each ending at 0.
        step: the reverse step rule (see :data:`StepFn`); it must not use ``no_grad``.
        use_checkpoint: recompute each step in the backward pass (activation
            checkpointing) so memory does not grow with the number of steps.
        width: most rows per network call (``None``: all of them).
    """
    plan = join_plan(grids, width)
    if not plan:
        return x
    flat = [v for rows, a, c in plan for v in (*rows, *a, *c)]
    table = torch.tensor(flat, dtype=torch.int64, device=x.device)
    offset = 0
    for rows, _, _ in plan:
        k = len(rows)
        idx, a, c = table[offset:offset + k], table[offset + k:offset + 2 * k], table[offset + 2 * k:offset + 3 * k]
        offset += 3 * k
        if k == x.shape[0] and rows == list(range(k)):  # idx is 0..B-1: no gather or scatter
            x = _apply(step, x, a, c, idx, use_checkpoint)
        else:
            x = x.index_copy(0, idx, _apply(step, x[idx], a, c, idx, use_checkpoint))
    return x


def run_common_length(x: Tensor, grids: list[list[int]], step: StepFn, use_checkpoint: bool = False) -> Tensor:
    """The authors' scheme: all ``B`` rows every step, no-op steps masked out (``B * n`` evaluations)."""
    if not grids:
        return x
    idx = torch.arange(x.shape[0], device=x.device)
    levels = torch.tensor(grids, dtype=torch.int64, device=x.device).T  # [n + 1, B], one copy to the device
    for k in range(levels.shape[0] - 1):
        a, c = levels[k], levels[k + 1]
        moved = _apply(step, x, a.clamp_min(1), c, idx, use_checkpoint)
        keep = (a == c).reshape(-1, *([1] * (x.dim() - 1)))
        x = torch.where(keep, x, moved)
    return x
