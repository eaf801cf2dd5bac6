"""How a stochastic defense is scored: every protocol from the same N fresh draws.

An adversarial example ``x_adv`` of sample ``i`` is re-classified on ``N`` fresh
draws of the defense's randomness (draws never used by the clean pass or the
attack). From those ``N`` predictions each protocol gives a verdict, all kept
side by side because the field disagrees on which one counts:

- ``single``: the first fresh draw alone (the SSNI paper's protocol);
- ``majority``: the majority vote of the ``N`` predictions (their most frequent
  class, as GNS classifies) is the label; a tie between the label and a wrong
  class counts as broken. It is a plurality, so it can sit above ``single``;
- ``worst``: every one of the ``N`` draws is correct (worst case over draws);
- ``any_iterate``: no iterate of the attack was misclassified on the draws the
  attack itself saw, and the returned example survives the first fresh draw
  (success at any point of the attack). Attacks that do not track their iterates
  (AutoAttack) fall back to ``worst`` here.

A sample is robust under a protocol if it was classified correctly on the clean
pass and every attack of the cascade leaves it robust under that protocol.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attacks.verdicts import fresh_verdicts  # the one definition, below attacks and evaluation

PROTOCOLS = {"single": "one evaluation on fresh randomness (the paper's protocol)",
             "majority": "majority vote over {n} fresh evaluations",
             "worst": "worst case over {n} fresh evaluations",
             "any_iterate": "no attack iterate fooled the draws the attack saw"}


def attack_verdicts(preds: list[int], y: int, fooled_during: bool | None, n: int | None = None) -> dict:
    """Verdicts of one sample under one attack from its stored fresh predictions (first ``n`` draws)."""
    p = torch.tensor(preds[:n] if n else preds).unsqueeze(1)
    verdicts = {k: bool(v[0]) for k, v in fresh_verdicts(p, torch.tensor([y])).items()}
    verdicts["any_iterate"] = verdicts["worst"] if fooled_during is None else verdicts["single"] and not fooled_during
    return verdicts


def robust_under(rows: list[dict], attack_keys: list[str], protocol: str, n: int | None = None) -> list[bool]:
    """Per sample: correct on the clean pass and robust under ``protocol`` after every attack.

    An attack that did not run on a sample (it was already broken under every protocol) leaves
    the verdict unchanged.
    """
    out = []
    for row in rows:
        ok = bool(row["clean_correct"])
        for key in attack_keys:
            result = row["attacks"].get(key)
            if not ok or result is None:
                continue
            ok = attack_verdicts(result["preds"], row["label"], result.get("fooled_during"), n)[protocol]
        out.append(ok)
    return out


def still_attackable(verdicts: dict[str, Tensor]) -> Tensor:
    """Samples the next attack of the cascade must still try: robust under *some* protocol
    (``worst`` and ``any_iterate`` imply ``single``, so single or majority covers them all)."""
    return verdicts["single"] | verdicts["majority"]
