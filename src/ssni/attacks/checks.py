"""Checks that a defense is fit to be attacked, and that the attack is not fooled by gradient masking.

``defense_checks``: is the model stochastic, does it return logits (not
probabilities), are its input gradients finite and non-zero, is it in eval mode
(AutoAttack's ``checks.py`` asks the same questions).

``sanity_checks`` (``ssni evaluate --sanity``), on a few samples, with the attack as configured
(its gradient mode included: a surrogate or BPDA configuration is checked on the surrogate or BPDA):
1. robust accuracy falls to about 0 when epsilon is large;
2. twice the steps neither raise robust accuracy (masking) nor lower it (the attack has not
   converged), judged by the budget ladder's paired rule (:mod:`ssni.evaluate.convergence`): an exact
   sign test on the samples robust at one budget and broken at the other, and a tolerance of 5% of
   the samples; no verdict but "failed" when fewer than ``MIN_ATTACKED`` samples were attacked;
3. the same for twice the EOT samples;
4. the configured gradient is at least as strong as BPDA (not run when BPDA is the configured one);
5. the loss rises over the iterations.
A check that fails is reported as failed, never dropped. A check that can only describe (the
gradient cosines, the stochasticity of a model that has no purifier) carries ``"informative": True``
and ``passed`` None, and is left out of :func:`all_passed`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import ALPHA, MIN_ATTACKED, TOLERANCE, budget_move, describe_move, dropped_beyond
from ..rng import ATTACK_DRAW, CLEAN_DRAW, RESCORE_DRAW
from .base import ThreatModel
from .bpda import BPDA
from .pgd import PGD, call_model
from .verdicts import fresh_verdicts

SLACK = 1  # samples of tolerance for "does not raise" on a stochastic defense


def all_passed(checks: list[dict]) -> bool:
    """Every check that has a verdict passed (informative entries have none)."""
    return all(c["passed"] for c in checks if not c.get("informative"))


def defense_checks(model: nn.Module, x: Tensor, y: Tensor) -> list[dict]:
    """Stochastic (a purification defense must draw fresh randomness on every call; informative for a
    bare classifier), logits not probabilities, finite non-zero input gradients, eval mode."""
    with torch.no_grad():
        a, b = call_model(model, x, None), call_model(model, x, None)
    stochastic = not torch.allclose(a, b)
    probabilities = bool((a >= 0).all() and (a <= 1).all() and torch.allclose(a.sum(1), torch.ones(len(a))))
    x_var = x.detach().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(call_model(model, x_var, None), y), x_var)[0]
    finite, nonzero = bool(torch.isfinite(grad).all()), bool((grad.flatten(1).abs().sum(1) > 0).all())
    eval_mode = not any(m.training for m in model.modules())
    return [
        _stochastic_check(stochastic, hasattr(model, "purifier")),
        {"check": "returns logits", "passed": not probabilities, "detail": "outputs look like probabilities"
         if probabilities else "outputs are unnormalised logits"},
        {"check": "finite non-zero input gradients", "passed": finite and nonzero,
         "detail": f"finite: {finite}, non-zero for every sample: {nonzero}"},
        {"check": "eval mode", "passed": eval_mode, "detail": "all modules in eval mode" if eval_mode
         else "some modules are in training mode (BatchNorm/Dropout change the function)"},
    ]


def _stochastic_check(stochastic: bool, purifier: bool) -> dict:
    """A purifier injects noise, so two calls must differ (identical outputs: the draws do not reach
    it, and EOT and fresh-draw scoring measure nothing); a bare classifier may be either."""
    detail = f"outputs differ between calls: {stochastic}"
    if not purifier:
        return {"check": "stochastic", "passed": None, "informative": True,
                "detail": detail + " (no purifier: a deterministic model is expected)"}
    return {"check": "stochastic", "passed": stochastic,
            "detail": detail + (" (a stochastic defense needs EOT and fresh-randomness re-scoring)" if stochastic
                                else ": a purification defense returned identical outputs for two calls")}


def _robust(target: nn.Module, model: nn.Module, attack: PGD, x: Tensor, y: Tensor, ids: Tensor,
            draws: int) -> Tensor:
    """``[B]`` robust after ``attack`` (gradient from ``target``): correct on every one of ``draws``
    fresh draws of ``model`` (the ``worst`` protocol of :func:`ssni.attacks.verdicts.fresh_verdicts`).
    Every run starts from the same attack draws and is scored on the same fresh draws, those of an
    evaluation, so two budgets differ by the budget and not by the draws (a paired comparison)."""
    if hasattr(model, "draw"):
        model.draw = ATTACK_DRAW
    x_adv = attack(target, x, y, sample_ids=ids)
    with torch.no_grad():
        preds = torch.stack([call_model(model, x_adv, ids, RESCORE_DRAW + r).argmax(1) for r in range(draws)])
    return fresh_verdicts(preds, y)["worst"]


def _budget_check(what: str, base: Tensor, doubled: Tensor, attacked: Tensor) -> dict:
    """Doubling a budget must neither help the defense (significantly, or by more than ``SLACK`` samples
    and the tolerance) nor break more samples (the ladder's paired rule: :func:`ssni.metrics.dropped_beyond`).
    ``base``, ``doubled``: ``[B]`` robust (and correct when clean); ``attacked``: ``[B]`` correct when clean."""
    n, k = len(base), int(attacked.sum())
    ids = lambda mask: mask.nonzero().flatten().tolist()  # noqa: E731
    move = budget_move(int(base.sum()), int(doubled.sum()), n, ids(base & attacked), ids(doubled & attacked))
    raised = move.p_rise < ALPHA or move.other - move.base > max(SLACK, TOLERANCE * n)
    dropped = dropped_beyond(move)
    verdict = (f"NO VERDICT: {k} samples attacked (correct when clean), at least {MIN_ATTACKED} needed"
               if k < MIN_ATTACKED else "masking?" if raised else "NOT CONVERGED: use a larger budget" if dropped
               else "converged")
    return {"check": f"attack converged in {what}", "passed": verdict == "converged",
            "detail": f"{describe_move(move)} with 2x {what} ({k} attacked; tolerance {TOLERANCE * n:.1f} "
                      f"samples): {verdict}", "lost": move.lost, "gained": move.gained, "attacked": k}


def sanity_checks(model: nn.Module, attack: PGD, x: Tensor, y: Tensor, ids: Tensor, draws: int = 8,
                  target: nn.Module | None = None) -> list[dict]:
    """Run the five gradient-masking checks with ``attack`` as the reference setting. ``target`` is the
    model the attack differentiates (its configured gradient mode; default ``model``); robust means
    correct on the clean pass and on every one of ``draws`` fresh draws of ``model`` after the attack."""
    target = model if target is None else target
    with torch.no_grad():
        clean = call_model(model, x, ids, CLEAN_DRAW).argmax(1) == y
    run = lambda a, t=target: _robust(t, model, a, x, y, ids, draws) & clean  # noqa: E731
    base = run(attack)
    trace = list(attack.loss_trace)
    big = replace(attack, threat=ThreatModel(attack.threat.norm, 1.0 if attack.threat.norm == "linf" else 30.0),
                  step_size=max(attack.step_size, 0.1), steps=max(attack.steps, 20))
    large = int(run(big).sum())
    n = len(y)
    checks = [
        {"check": "robust accuracy ~0 at large epsilon", "passed": large <= max(1, n // 10),
         "detail": f"{large}/{n} robust at eps {big.threat.eps}"},
        _budget_check("steps", base, run(replace(attack, steps=2 * attack.steps)), clean),
        _budget_check("EOT samples", base, run(replace(attack, eot=2 * attack.eot)), clean),
        _loss_check(trace),
    ]
    if hasattr(model, "purifier") and not isinstance(target, BPDA):
        bpda, full = int(run(attack, BPDA(model)).sum()), int(base.sum())
        mode = "full" if target is model else "surrogate"
        checks.append({"check": f"{mode} gradient at least as strong as BPDA", "passed": full <= bpda + SLACK,
                       "detail": f"{mode} {full}/{n}, BPDA {bpda}/{n}"})
    return checks


def _loss_check(trace: list[float]) -> dict:
    """The attack's mean loss must end above where it started (informative with fewer than 2 points)."""
    if len(trace) < 2:
        return {"check": "loss rises over the iterations", "passed": None, "informative": True,
                "detail": f"{len(trace)} loss value(s): one step leaves nothing to compare"}
    return {"check": "loss rises over the iterations", "passed": trace[-1] > trace[0],
            "detail": f"loss {trace[0]:.3f} -> {trace[-1]:.3f}"}
