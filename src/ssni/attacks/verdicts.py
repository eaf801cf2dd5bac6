"""Verdicts of a stochastic defense's predictions on ``N`` fresh draws, per protocol.

The protocols (``single``, ``majority``, ``worst``) are defined in :mod:`ssni.evaluate.scoring`,
which scores evaluation runs with this function; it lives here, below both, so that the
sanity checks (:mod:`ssni.attacks.checks`) score the same way without importing the
evaluation package (which imports the attacks).
"""

from __future__ import annotations

import torch
from torch import Tensor


def fresh_verdicts(preds: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``preds: [N, B]`` predictions of ``N`` fresh draws -> ``{protocol: [B] bool robust}``.

    ``single``: the first draw is correct; ``majority``: the label gets more votes than any
    other class (a tie counts as broken); ``worst``: every draw is correct."""
    correct = preds == y
    votes_for_label = correct.sum(0)
    others = torch.stack([(preds == c).sum(0) for c in range(int(preds.max()) + 1)])
    others[y.clamp_max(others.shape[0] - 1), torch.arange(len(y))] = 0
    strongest_other = others.max(0).values
    return {"single": correct[0], "majority": votes_for_label > strongest_other, "worst": correct.all(0)}
