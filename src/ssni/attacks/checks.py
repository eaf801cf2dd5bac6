"""Checks that a defense is fit to be attacked, and that the attack is not fooled by gradient masking.

``defense_checks``: is the model stochastic, does it return logits (not
probabilities), are its input gradients finite and non-zero, is it in eval mode
(AutoAttack's ``checks.py`` asks the same questions).

``sanity_checks`` (``ssni evaluate --sanity``), on a few samples:
1. robust accuracy falls to about 0 when epsilon is large;
2. twice the PGD steps neither raise robust accuracy (masking) nor lower it by the
   half-width of the reference setting's 95% interval or more (the attack has not converged:
   the criterion of the budget ladder, :func:`ssni.metrics.changed_beyond_noise`);
3. the same for twice the EOT samples;
4. the exact-gradient attack is at least as strong as BPDA;
5. the loss rises over the iterations.
A check that fails is reported as failed, never dropped.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import changed_beyond_noise
from .base import ThreatModel
from .bpda import BPDA
from .pgd import PGD, call_model
from .verdicts import fresh_verdicts

SLACK = 1  # samples of tolerance for "does not raise" on a stochastic defense


def defense_checks(model: nn.Module, x: Tensor, y: Tensor) -> list[dict]:
    with torch.no_grad():
        a, b = call_model(model, x, None), call_model(model, x, None)
    stochastic = not torch.allclose(a, b)
    probabilities = bool((a >= 0).all() and (a <= 1).all() and torch.allclose(a.sum(1), torch.ones(len(a))))
    x_var = x.detach().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(call_model(model, x_var, None), y), x_var)[0]
    finite, nonzero = bool(torch.isfinite(grad).all()), bool((grad.flatten(1).abs().sum(1) > 0).all())
    eval_mode = not any(m.training for m in model.modules())
    return [
        {"check": "stochastic", "passed": True, "detail": f"outputs differ between calls: {stochastic} "
         "(a stochastic defense needs EOT and fresh-randomness re-scoring)"},
        {"check": "returns logits", "passed": not probabilities, "detail": "outputs look like probabilities"
         if probabilities else "outputs are unnormalised logits"},
        {"check": "finite non-zero input gradients", "passed": finite and nonzero,
         "detail": f"finite: {finite}, non-zero for every sample: {nonzero}"},
        {"check": "eval mode", "passed": eval_mode, "detail": "all modules in eval mode" if eval_mode
         else "some modules are in training mode (BatchNorm/Dropout change the function)"},
    ]


def _robust(model: nn.Module, attack: PGD, x: Tensor, y: Tensor, ids: Tensor, draws: int) -> int:
    """Samples still correct on every one of ``draws`` fresh draws after the attack (the ``worst``
    protocol of :func:`ssni.attacks.verdicts.fresh_verdicts`, as evaluation runs score it)."""
    x_adv = attack(model, x, y, sample_ids=ids)
    with torch.no_grad():
        preds = torch.stack([call_model(model, x_adv, ids).argmax(1) for _ in range(draws)])
    return int(fresh_verdicts(preds, y)["worst"].sum())


def _budget_check(what: str, base: int, doubled: int, n: int) -> dict:
    """Doubling a budget must neither help the defense (beyond ``SLACK``) nor lower robust accuracy
    by the half-width of the reference budget's 95% interval or more (the attack has not converged)."""
    moved, half = changed_beyond_noise(base, doubled, n)
    raised, dropped = doubled > base + SLACK, moved and doubled < base
    verdict = "masking?" if raised else "NOT CONVERGED: use a larger budget" if dropped else "converged"
    return {"check": f"attack converged in {what}", "passed": not (raised or dropped),
            "detail": f"{base}/{n} -> {doubled}/{n} with 2x {what} (moves of {half * n:.1f} samples or more "
                      f"count): {verdict}"}


def sanity_checks(model: nn.Module, attack: PGD, x: Tensor, y: Tensor, ids: Tensor, draws: int = 8) -> list[dict]:
    """Run the five gradient-masking checks with ``attack`` as the reference setting; robust means
    correct on every one of ``draws`` fresh draws (the run's ``rescore_draws``)."""
    base = _robust(model, attack, x, y, ids, draws)
    trace = list(attack.loss_trace)
    big = replace(attack, threat=ThreatModel(attack.threat.norm, 1.0 if attack.threat.norm == "linf" else 30.0),
                  step_size=max(attack.step_size, 0.1), steps=max(attack.steps, 20))
    results = {"large epsilon": _robust(model, big, x, y, ids, draws),
               "2x steps": _robust(model, replace(attack, steps=2 * attack.steps), x, y, ids, draws),
               "2x EOT": _robust(model, replace(attack, eot=2 * attack.eot), x, y, ids, draws)}
    bpda = _robust(BPDA(model), attack, x, y, ids, draws) if hasattr(model, "purifier") else None
    n = len(y)
    checks = [
        {"check": "robust accuracy ~0 at large epsilon", "passed": results["large epsilon"] <= max(1, n // 10),
         "detail": f"{results['large epsilon']}/{n} robust at eps {big.threat.eps}"},
        _budget_check("steps", base, results["2x steps"], n),
        _budget_check("EOT samples", base, results["2x EOT"], n),
        {"check": "loss rises over the iterations", "passed": len(trace) < 2 or trace[-1] > trace[0],
         "detail": f"loss {trace[0]:.3f} -> {trace[-1]:.3f}" if trace else "no iterations"},
    ]
    if bpda is not None:
        checks.append({"check": "full gradient at least as strong as BPDA", "passed": base <= bpda + SLACK,
                       "detail": f"full {base}/{n}, BPDA {bpda}/{n}"})
    return checks
