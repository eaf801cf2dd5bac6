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
pass and every attack of the cascade leaves it robust under that protocol. A later
attack skips a sample once the cascade finds it broken under every protocol on the
``N`` draws (:func:`still_attackable`); a skipped sample counts as broken under every
protocol and every number of draws, also in the ``k < N`` curve
(:func:`ssni.evaluate.summary.robust_vs_draws`): had the cascade been judged on ``k``
draws the later attack would have run on it, so keeping the earlier attack's ``k``-draw
verdict would count as robust a sample no later attack was allowed to try.

Attacks with several outputs (AutoAttack's APGD-CE and APGD-DLR runs, ``attack.candidates``):
every candidate is re-classified on the same ``N`` fresh draws and scored as its own entry,
and a sample is robust only if it is robust against every candidate (the union of the
candidates' successes, as for the attacks of a cascade). No choice among candidates is made on
the draws that score them: picking, per sample, the candidate with the fewest correct draws and
then reading ``single`` or ``majority`` from the same draws is biased low (two equal candidates,
p = 0.6 per draw, N = 8: single reads 0.50 where one candidate gives 0.60 and the union 0.36).
``worst`` is unchanged by this: robust against every candidate on every draw is what the fewest-
correct choice gave. The stored example is that fewest-correct candidate (``preds``: its
predictions); ``candidate_preds`` holds every candidate's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attacks.verdicts import fresh_verdicts  # the one definition, below attacks and evaluation

PROTOCOLS = {"single": "one evaluation on fresh randomness (the paper's protocol)",
             "majority": "majority vote over {n} fresh evaluations",
             "worst": "worst case over {n} fresh evaluations",
             "any_iterate": "no attack iterate fooled the draws the attack saw"}


def attack_verdicts(preds: list[int], y: int, fooled_during: bool | None, n: int | None = None,
                    candidate_preds: list[list[int]] | None = None) -> dict:
    """Verdicts of one sample under one attack from its stored fresh predictions (first ``n`` draws);
    with ``candidate_preds`` (one list per candidate) robust means robust against every candidate."""
    p = torch.tensor([c[:n] if n else c for c in (candidate_preds or [preds])]).T  # [draws, K]
    per_candidate = fresh_verdicts(p, torch.full((p.shape[1],), y))
    verdicts = {k: bool(v.all()) for k, v in per_candidate.items()}
    verdicts["any_iterate"] = verdicts["worst"] if fooled_during is None else verdicts["single"] and not fooled_during
    return verdicts


def robust_under(rows: list[dict], attack_keys: list[str], protocol: str, n: int | None = None) -> list[bool]:
    """Per sample: correct on the clean pass and robust under ``protocol`` after every attack (on the
    first ``n`` fresh draws, default all). A sample a later attack skipped counts as broken (module
    docstring)."""
    out = []
    for row in rows:
        ok = bool(row["clean_correct"])
        for key in attack_keys:
            result = row["attacks"].get(key)
            if not ok:
                break
            ok = result is not None and attack_verdicts(result["preds"], row["label"], result.get("fooled_during"),
                                                        n, result.get("candidate_preds"))[protocol]
        out.append(ok)
    return out


def union_verdicts(preds: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``preds: [K, N, B]`` fresh predictions of ``K`` candidates -> ``{protocol: [B]}`` robust against
    every candidate (``[N, B]`` is one candidate)."""
    per = [fresh_verdicts(p, y) for p in (preds if preds.dim() == 3 else preds[None])]
    return {k: torch.stack([v[k] for v in per]).all(0) for k in per[0]}


def stored_candidate(preds: Tensor, y: Tensor) -> Tensor:
    """``[B]`` the candidate whose example is stored: fewest correct draws (the first on ties)."""
    return (preds == y).sum(1).argmin(0)


def candidate_fields(preds: Tensor, pick: Tensor, j: int) -> dict:
    """Row ``j``'s stored predictions: the stored candidate's ``preds`` and, with several candidates,
    every candidate's ``candidate_preds`` (``preds: [K, N, B]``)."""
    out = {"preds": preds[pick[j], :, j].tolist()}
    if preds.shape[0] > 1:
        out["candidate_preds"] = preds[:, :, j].tolist()
    return out


def still_attackable(verdicts: dict[str, Tensor]) -> Tensor:
    """Samples the next attack of the cascade must still try: robust under *some* protocol
    (``worst`` and ``any_iterate`` imply ``single``, so single or majority covers them all)."""
    return verdicts["single"] | verdicts["majority"]
