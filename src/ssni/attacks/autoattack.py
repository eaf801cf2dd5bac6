"""AutoAttack's APGD for randomized defenses, through the reference implementation (PyPI ``pyautoattack``).

AutoAttack's ``rand`` version is APGD-CE then APGD-DLR, each with EOT. Its
``run_standard_evaluation`` is not used: it skips the samples that its own single
stochastic clean pass misclassifies and hands back the *original* image of every
sample it did not break on one pass, which a fresh-randomness re-score then
counts as robust. Instead every sample given to this attack is attacked by each
APGD run with ``best_loss=True`` (the iterate of highest loss, whether or not
one pass was fooled), and all outputs are returned as ``candidates``: the runner
re-scores every candidate on fresh draws and keeps, per sample, the worst.

``steps``, ``eot`` and ``restarts`` reach the APGD objects. Inside AutoAttack the
defense's draws are keyed by batch position (AutoAttack passes no sample ids),
so AutoAttack results are reproducible for the same batches but, unlike PGD's,
not batch-independent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import ThreatModel

NORMS = {"linf": "Linf", "l2": "L2"}
VERSIONS = {"rand": ("ce", "dlr"), "apgd-ce": ("ce",), "apgd-dlr": ("dlr",)}


class _PositionalIds(nn.Module):
    """AutoAttack calls ``model(x)``: give it the defense with default (positional) sample ids."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@dataclass
class AutoAttackRand:
    """APGD-CE and APGD-DLR (``version="rand"``) with ``steps`` iterations, ``eot`` draws per step."""

    threat: ThreatModel = field(default_factory=ThreatModel)
    version: str = "rand"
    seed: int = 0
    steps: int = 100
    eot: int = 20
    restarts: int = 1
    candidates: list[Tensor] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ConfigError(f"AutoAttack version {self.version!r} is not supported; choose one of {list(VERSIONS)}")
        if self.steps < 1 or self.eot < 1 or self.restarts < 1:
            raise ConfigError("AutoAttack needs steps, eot and restarts >= 1")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        """The highest-loss point of each APGD run for every sample; the first run's is returned and
        all of them are left in ``self.candidates``."""
        try:
            from pyautoattack.autopgd_base import APGDAttack
        except ImportError as err:
            raise ConfigError("AutoAttack needs the package pyautoattack: pip install 'ssni[autoattack]'") from err
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        self.candidates = []
        for loss in VERSIONS[self.version]:
            apgd = APGDAttack(_PositionalIds(model), n_iter=self.steps, norm=NORMS[self.threat.norm],
                              n_restarts=self.restarts, eps=self.threat.eps, seed=self.seed, loss=loss,
                              eot_iter=self.eot, device=x.device)
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(self.seed)  # APGD's random starts draw from the global generator
                self.candidates.append(apgd.perturb(x.detach(), y, best_loss=True).detach())
        return self.candidates[0]
