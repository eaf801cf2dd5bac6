"""One registry per kind: a name maps to the function that builds it from its config section.

Adding a purifier, a reweighting or an attack is its own module plus one line here:
the values a config accepts (``CHOICES`` in :mod:`ssni.evaluate.config`) are read from
these dicts, the builders look names up instead of branching on them, and tests
parametrized over the registries cover a new entry. Models have their own data
registries (:data:`ssni.checkpoints.public.PUBLIC` and the weights manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..attacks import PGD
from ..attacks.adaptive import AdaptiveAttack
from ..attacks.apgd import APGD
from ..attacks.autoattack import AutoAttackRand
from ..attacks.transfer import TransferAttack
from ..purifiers import GDMP, GNS, DiffPure
from ..reweight import REWEIGHTS  # its registry lives with the reweightings

if TYPE_CHECKING:
    from .config import AttackConfig, PurifierConfig

# (diffusion network, [purifier] section, settings every purifier shares) -> Purifier
PURIFIERS: dict[str, Callable[[Any, PurifierConfig, dict], Any]] = {
    "diffpure": lambda unet, p, common: DiffPure(unet, t_star=p.t_star, **common),
    "gdmp": lambda unet, p, common: GDMP(unet, t_star=p.t_star, rounds=p.rounds, guide_scale=p.guide_scale,
                                         guide_batch=p.guide_batch, reference_compat=p.reference_compat, **common),
    "gns": lambda unet, p, common: GNS(unet, levels=p.levels, **common),
}

# ([[attacks]] entry, PGD settings, APGD settings) -> attack; the gradient mode picks what it differentiates
ATTACKS: dict[str, Callable[[AttackConfig, dict, dict], Any]] = {
    "pgd": lambda a, pgd, apgd: PGD(**pgd),
    "bpda": lambda a, pgd, apgd: PGD(**pgd),  # PGD with gradient = "bpda"
    "apgd": lambda a, pgd, apgd: APGD(**apgd),  # its own step schedule: step_size, sign_step unused
    # APGD on the feasible set e(x) <= score_target; score_weight is its penalty
    "adaptive": lambda a, pgd, apgd: AdaptiveAttack(**apgd, score_target=a.score_target, penalty=a.score_weight),
    "transfer": lambda a, pgd, apgd: TransferAttack(APGD(**apgd)),  # against DiffPure at the clean levels
    "autoattack": lambda a, pgd, apgd: AutoAttackRand(pgd["threat"], version=a.version, seed=pgd["seed"],
                                                      steps=a.steps, eot=a.eot, restarts=a.restarts),
}


class Names:
    """The live set of names of a registry (plus fixed extras such as ``"none"``), for config checks."""

    def __init__(self, registry: dict, *extra: str):
        self.registry, self.extra = registry, extra

    def __contains__(self, name: object) -> bool:
        return name in self.extra or name in self.registry

    def __iter__(self):
        return iter((*self.extra, *self.registry))


__all__ = ["ATTACKS", "PURIFIERS", "REWEIGHTS", "Names"]
