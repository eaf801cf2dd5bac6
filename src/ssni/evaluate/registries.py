"""One registry per kind: a name maps to what builds it and the config it reads.

Adding a purifier, a reweighting or an attack is its own module plus one line here:
the values a config accepts (``CHOICES`` in :mod:`ssni.evaluate.config`), the keys of each
method's ``[purifier.<name>]`` table and the ``[[attacks]]`` keys each attack reads are taken
from these entries, the builders look names up instead of branching on them, and tests
parametrized over the registries cover a new entry. Models have their own data registries
(:data:`ssni.checkpoints.public.PUBLIC` and the weights manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..attacks import PGD
from ..attacks.adaptive import AdaptiveAttack
from ..attacks.apgd import APGD
from ..attacks.autoattack import AutoAttackRand
from ..attacks.transfer import TransferAttack
from ..purifiers import GDMP, GNS, DiffPure, DiffPureSettings, GDMPSettings, GNSSettings
from ..reweight import REWEIGHTS  # its registry lives with the reweightings


class PurifierEntry(NamedTuple):
    """A purifier's frozen settings dataclass (its ``[purifier.<name>]`` table) and its builder,
    called as ``build(diffusion network, **settings fields, **shared [purifier] settings)``; a
    purifier class whose fields carry the settings' names is its own builder."""

    settings: type
    build: Callable[..., Any]


PURIFIERS: dict[str, PurifierEntry] = {
    "diffpure": PurifierEntry(DiffPureSettings, DiffPure),
    "gdmp": PurifierEntry(GDMPSettings, GDMP),
    "gns": PurifierEntry(GNSSettings, GNS),
}


class AttackEntry(NamedTuple):
    """An attack's builder ``build(entry, PGD settings, APGD settings)``, the ``[[attacks]]`` keys it
    reads besides :data:`SHARED_ATTACK_KEYS` (a key it does not read is an error in a config) and
    the ``gradient`` modes it takes (``surrogate`` brings the key ``surrogate_steps``)."""

    build: Callable[[Any, dict, dict], Any]  # (the attack's AttackConfig, PGD settings, APGD settings)
    keys: frozenset[str]
    gradients: tuple[str, ...] = ("exact",)

    @property
    def reads(self) -> frozenset[str]:
        """Every ``[[attacks]]`` key this attack reads."""
        surrogate = {"surrogate_steps"} if "surrogate" in self.gradients else set()
        return SHARED_ATTACK_KEYS | self.keys | surrogate


SHARED_ATTACK_KEYS = frozenset({"name", "norm", "eps", "steps", "eot", "gradient"})
_PGD = frozenset({"step_size", "random_start", "sign_step", "eot_batch"})
_APGD = frozenset({"loss", "restarts", "targeted", "iterate", "eot_batch"})  # its own step schedule
_ANY = ("exact", "surrogate", "bpda")

# the gradient mode (build.build_attack) picks what an attack differentiates
ATTACKS: dict[str, AttackEntry] = {
    "pgd": AttackEntry(lambda a, pgd, apgd: PGD(**pgd), _PGD, _ANY),
    "bpda": AttackEntry(lambda a, pgd, apgd: PGD(**pgd), _PGD, ("exact", "bpda")),  # PGD with gradient = "bpda"
    "apgd": AttackEntry(lambda a, pgd, apgd: APGD(**apgd), _APGD, _ANY),
    # a trust-region feasible-direction attack on e(x) <= score_target, in union with plain APGD
    "adaptive": AttackEntry(lambda a, pgd, apgd: AdaptiveAttack(**apgd, score_target=a.score_target),
                            _APGD | {"score_target"}, ("exact", "surrogate")),
    "transfer": AttackEntry(lambda a, pgd, apgd: TransferAttack(APGD(**apgd)), _APGD),  # vs DiffPure at clean levels
    "autoattack": AttackEntry(lambda a, pgd, apgd: AutoAttackRand(pgd["threat"], version=a.version, seed=pgd["seed"],
                                                                  steps=a.steps, eot=a.eot, restarts=a.restarts),
                              frozenset({"version", "restarts"})),
}


class Names:
    """The live set of names of a registry (plus fixed extras such as ``"none"``), for config checks."""

    def __init__(self, registry: dict, *extra: str):
        self.registry, self.extra = registry, extra

    def __contains__(self, name: object) -> bool:
        return name in self.extra or name in self.registry

    def __iter__(self):
        return iter((*self.extra, *self.registry))


__all__ = ["ATTACKS", "PURIFIERS", "REWEIGHTS", "SHARED_ATTACK_KEYS", "AttackEntry", "Names", "PurifierEntry"]
