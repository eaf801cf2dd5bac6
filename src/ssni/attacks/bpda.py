"""BPDA (Athalye et al., 2018): the purifier is run forward, its backward pass is the identity.

``BPDA(defense)`` is a module with the defense's forward value whose input
gradient skips the purifier (and SSNI): ``classifier(x + (purify(x) - x).detach())``.
Wrap it in PGD with ``eot > 1`` for BPDA+EOT (or set ``gradient = "bpda"`` on an attack,
:mod:`ssni.attacks.gradient_modes`). It is a gradient estimator, not an attack of its own.
It shares the defense's draw counter, so its draws are the defense's draws.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..defense import Defense


class BPDA(nn.Module):
    takes_sample_ids = True

    def __init__(self, defense: Defense):
        super().__init__()
        self.defense = defense

    def reserve_draws(self, count: int) -> int:
        """Draws come from the defense's counter (PGD stacks ``eot_batch`` of them per pass)."""
        return self.defense.reserve_draws(count)

    def forward(self, x: Tensor, sample_ids: Tensor | None = None, draw: int | Tensor | None = None) -> Tensor:
        """Logits averaged over votes; ``draw`` as in :meth:`ssni.defense.Defense.forward`."""
        d = self.defense
        if draw is None:
            draw = d.reserve_draws(1)
        logits = []
        for vote in range(d.votes):
            with torch.no_grad():
                purified, _ = d.purify(x, sample_ids, draw, vote)
            logits.append(d.classifier(x + (purified - x).detach()))
        return torch.stack(logits).mean(0)
