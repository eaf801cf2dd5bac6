"""The steps of the feasible-set attack (:mod:`ssni.attacks.adaptive`): a linear programme and a Newton step.

At an iterate ``x_k`` with estimates ``g = grad L`` (attack loss), ``h = grad c`` (constraint) and ``c_k``,
the attack's step solves

    max  g . d   subject to   c_k + h . d <= -m,   d in the trust region of radius eta,

the steepest ascent of ``L`` among steps that keep the linearised constraint ``m`` inside its boundary
(from an infeasible point: the steepest ascent among those that bring it back, or the step of least
``h . d`` when none does). This is Zoutendijk's feasible-direction step, or the SQP step with a linear
model, restated for an l_p ball. For l_inf the region is a box per pixel (``[-eta, eta]`` cut by the ball
and ``[0, 1]``), and the programme is a fractional knapsack (:func:`linf_step`); for l_2 it has a closed
form (:func:`l2_step`). Its multiplier is the ratio at which the knapsack stops, solved afresh at every
step. :func:`newton_restore` is the restoration step on ``c`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


def linf_step(g: Tensor, h: Tensor, budget: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``d`` of ``max g.d`` subject to ``h.d <= budget`` and ``lo <= d <= hi`` (per sample; ``lo <= 0 <= hi``).

    A fractional knapsack, solved exactly: start at the sign step (``d_i = hi_i`` where ``g_i > 0``,
    ``lo_i`` where ``g_i < 0``, 0 where ``g_i = 0``), then move the pixels whose move lowers ``h.d`` to
    the end of their range that lowers it, fewest units of ``g.d`` lost per unit of ``h.d`` saved first
    (``|g_i| / |h_i|``), the last one only as far as the budget needs; all of them when it cannot be
    met (the step of least ``h.d``). ``g, h, lo, hi``: ``[B, ...]``; ``budget``: ``[B]``.
    """
    a, b, low, high = (t.flatten(1) for t in (g, h, lo, hi))
    d = torch.where(a > 0, high, torch.where(a < 0, low, torch.zeros_like(a)))
    other = torch.where(b > 0, low, high)  # the end of the range that lowers h.d
    movable = (a * b > 0) | ((a == 0) & (b != 0))
    ratio = torch.where(movable, a.abs() / torch.where(movable, b.abs(), 1.0), torch.inf)
    order = ratio.argsort(1)
    each = torch.where(movable, b * (d - other), 0.0).gather(1, order)  # h.d saved by each move, in order
    saved = each.cumsum(1)
    need = (b * d).sum(1) - budget  # how far h.d must fall
    moves = torch.where(need > 0, (saved < need[:, None]).sum(1) + 1, 0).clamp_max(a.shape[1])
    last = (moves - 1).clamp_min(0)[:, None]
    excess = (saved.gather(1, last) - need[:, None]).clamp_min(0)  # saved beyond the need by the last move
    share = torch.ones_like(each).scatter(1, last, 1 - excess / each.gather(1, last).clamp_min(1e-30))
    ranked = torch.where(torch.arange(a.shape[1], device=a.device) < moves[:, None], share, 0.0)
    move = torch.zeros_like(ranked).scatter(1, order, ranked) * movable
    return torch.where(move >= 1, other, d + move * (other - d)).clamp(low, high).reshape(g.shape)


def l2_step(g: Tensor, h: Tensor, budget: Tensor, eta: Tensor) -> Tensor:
    """``d`` of ``max g.d`` subject to ``h.d <= budget`` and ``||d||_2 <= eta`` (closed form, per sample).

    The ascent ``eta g / ||g||`` when it meets the budget; else the point of the circle in the
    plane of ``g`` and ``h`` with ``h.d = budget`` (``-eta h / ||h||`` when no point of the ball does)."""
    a, b = g.flatten(1), h.flatten(1)
    unit = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    a_hat, b_hat = unit(a), unit(b)
    alpha = (budget / (eta * b.norm(dim=1)).clamp_min(1e-12)).clamp(-1, 1)[:, None]
    across = unit(a - (a * b_hat).sum(1, keepdim=True) * b_hat)
    bound = alpha * b_hat + (1 - alpha ** 2).sqrt() * across
    free = (eta * (b * a_hat).sum(1) <= budget)[:, None]
    return (eta[:, None] * torch.where(free, a_hat, bound)).reshape(g.shape)


@dataclass
class Point:
    """An iterate's EOT estimates: ``grad`` of the attack loss, ``grad_c`` of the constraint, ``[B]``
    mean ``loss`` and ``c`` over the draws."""

    grad: Tensor
    grad_c: Tensor
    loss: Tensor
    c: Tensor

    def where(self, mask: Tensor, other: Point) -> Point:
        """Per sample: this point's estimates where ``mask``, else ``other``'s."""
        pick = lambda a, b: torch.where(mask.reshape(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
        return Point(*(pick(getattr(self, f.name), getattr(other, f.name)) for f in fields(Point)))


def newton_restore(h: Tensor, need: Tensor, eta: Tensor, norm: str) -> Tensor:
    """The displacement of one Newton step that lowers ``c`` by ``need`` (``[B]``, >= 0) to first order:
    ``-t sign(h)`` for l_inf, ``-t h / ||h||_2`` for l_2, with ``t = need / ||h||_*`` (the dual norm: the
    first-order change per unit step), at most ``eta``."""
    view = (-1, *[1] * (h.dim() - 1))
    size = h.flatten(1).norm(p=1 if norm == "linf" else 2, dim=1).clamp_min(1e-12)
    t = torch.minimum(need / size, eta).reshape(view)
    return -t * (h.sign() if norm == "linf" else h / size.reshape(view))


def trust_box(x_k: Tensor, x: Tensor, eps: float, eta: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``: the l_inf steps from ``x_k`` of at most ``eta`` (``[B]``) that stay in the ball of
    radius ``eps`` around ``x`` and in ``[0, 1]``."""
    r = eta.reshape(-1, *[1] * (x.dim() - 1))
    lo = torch.maximum(-r, torch.maximum(x - eps, torch.zeros_like(x)) - x_k)
    hi = torch.minimum(r, torch.minimum(x + eps, torch.ones_like(x)) - x_k)
    return lo, hi


def mix(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per sample: ``a`` where ``mask``, else ``b``."""
    return torch.where(mask.reshape(-1, *[1] * (a.dim() - 1)), a, b)
