"""AutoAttack for randomized defenses through the reference implementation (PyPI ``pyautoattack``).

The ``rand`` version runs APGD-CE and APGD-DLR with EOT over 20 draws. Its own
tally decides each sample on one stochastic pass and it skips samples that one
clean pass misclassified; our runner therefore re-scores its adversarial
examples on fresh randomness. Inside AutoAttack the defense's draws are keyed
by batch position (AutoAttack passes no sample ids), so AutoAttack results are
reproducible for the same batches but, unlike PGD's, not batch-independent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..errors import ConfigError
from .base import ThreatModel

NORMS = {"linf": "Linf", "l2": "L2"}


class _PositionalIds(nn.Module):
    """AutoAttack calls ``model(x)``: give it the defense with default (positional) sample ids."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@dataclass
class AutoAttackRand:
    threat: ThreatModel = field(default_factory=ThreatModel)
    version: str = "rand"
    seed: int = 0
    n_iter: int | None = None  # APGD iterations (AutoAttack's default: 100)
    eot: int | None = None  # EOT draws per APGD step (the rand version's default: 20)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        try:
            from pyautoattack import AutoAttack
        except ImportError as err:
            raise ConfigError("AutoAttack needs the package pyautoattack: pip install 'ssni[autoattack]'") from err
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        attack = AutoAttack(_PositionalIds(model), norm=NORMS[self.threat.norm], eps=self.threat.eps,
                            version=self.version, seed=self.seed, device=x.device)
        for apgd in (attack.apgd, attack.apgd_targeted):
            apgd.n_iter = self.n_iter or apgd.n_iter
            apgd.eot_iter = self.eot or apgd.eot_iter
        x_adv, _ = attack.run_standard_evaluation(x.detach(), y, batch_size=x.shape[0])
        return x_adv.detach()
