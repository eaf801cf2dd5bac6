"""An SSNI-aware attack on a feasible set: fool the classifier while the input still looks clean.

SSNI gives an input with a low score norm ``e(x)`` little noise (METHOD §3), so the
weakness it adds is that adversarial inputs that *look* clean are purified less. The
attack searches the inputs the defense treats as clean,

    maximise   L(x) = mean over draws of loss(defense(x), y)      (APGD's DLR, margin or CE)
    subject to x in the ball B(x0, eps) and c(x) = (e(x) - e_target) / s <= 0,

where ``e_target`` is a score norm at which SSNI gives part of ``t*`` only
(:func:`feasible_target`; SSNI-N: ``mu`` gives half of ``t* - 1 + b``, ``mu + tau``
``sigmoid(1) = 73%`` of it) and ``s`` is a scale (SSNI-N: ``tau``).

**One iteration.** (1) The step: the linear programme of :mod:`ssni.attacks.feasible_steps`, the
steepest ascent of ``L`` among steps whose linearised ``c`` stays ``margin`` inside the boundary,
within a trust region of radius ``eta``. (2) Restoration: ``restore_steps`` Newton steps on ``c``
alone toward ``c = -margin``, each from a score-norm-only estimate at the point reached (the score
norm is far from linear: on the MNIST demo an l_inf step of 0.04 along the linearised-feasible
direction raises ``c`` by about 28). (3) Acceptance: the trial point, estimated on fresh draws, is
accepted when feasible on them (``c <= tolerance``) or, from an infeasible iterate, less infeasible;
``eta`` then grows by 1.25 (up to ``eps``). A rejected trial halves ``eta`` and sends the iterate back
to the best feasible point so far, with its gradients. ``eta`` starts at ``feasible_step * eps``
(default ``eps / 8``; APGD's first step, ``2 eps``, leaves a thin feasible set at once). *Best* is the
highest attack loss ``L`` among the iterates feasible on their own draws, never a penalised objective;
the multiplier of the constraint is the knapsack's ratio, solved afresh at every step, so nothing
accumulates. No momentum: a mixed step would leave the linearised constraint.

**Runs and the choice.** The first run starts at the clean input (feasible when ``e(x0) <= e_target``;
otherwise the first steps restore feasibility); run ``r > 0`` at a random point of the ball of radius
``eps r / restarts``. The ``shortlist`` feasible iterates of highest ``L`` (and the clean start; a run
that never gets feasible offers its least infeasible iterates) are re-scored on ``heldout_draws`` fresh
draws the gradient never used, on the defense that is scored (with ``gradient = "surrogate"``, the full
defense, not the surrogate chain: ``model.scored``); the feasible candidate is the held-out-feasible one
with the most misclassified held-out draws (ties: highest mean margin), else the best-scoring one.

**Union with the unconstrained attack** (``unconstrained = True``, default): the attack also runs plain
APGD (same loss, steps, EOT, restarts, with APGD's own step schedule) and exposes both outputs as
``candidates`` (``[feasible, unconstrained]``), which the evaluation runner scores per sample, so the
attack is never weaker there than APGD at its budget. It returns, per sample, the candidate with more
misclassified held-out draws (``from_unconstrained``). ``levels`` (``[R, B]``, mean over held-out
draws), ``score_norms`` and ``feasible`` describe the *feasible* candidate: what SSNI does with the best
clean-looking point found.

**Gradients.** ``g`` is the gradient of the loss through the classifier, the purifier at the levels
SSNI picks and, via the straight-through relaxed levels (:func:`ssni.diffusion.forward_jump`: exact
but for that relaxation), the score network; ``h`` is the gradient of the score norm the defense
computed in that same forward pass (``return_score_norm``). When that score norm carries no gradient
(``gradient = "surrogate"``, or ``ssni.differentiable = False``) ``h`` comes from a differentiable
score-norm pass with the same noise. Cost per iteration: one forward and backward pass of the defense
per EOT draw, plus ``restore_steps`` score-norm passes per draw; the union adds one APGD run.
Measured results: docs/adaptive/README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from ..defense import Defense, resize
from ..errors import ConfigError
from ..reweight import LinearReweight, Reweight
from ..rng import SampleNoise, batch_ids
from ..score_norm import score_norm
from ..validation import check_images, trusted_images
from .apgd import APGD, LOSSES, margin_loss
from .base import ThreatModel
from .feasible_steps import Point, l2_step, linf_step, mix, newton_restore, trust_box
from .pgd import trace_values

TARGETS = ("mu", "mu+tau", "clean")
SIGMOID_ONE = 1 / (1 + math.exp(-1))  # share of the sigmoid's range at mu + tau
GROW = 1.25  # trust-region growth of an accepted step (a rejected one halves)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def feasible_target(reweight: Reweight, target: str | float) -> tuple[float | None, float | None]:
    """``(e_target, scale)`` for a reweighting; ``None`` where they must come from the clean inputs.

    ``"mu"``: where SSNI gives half of its range (SSNI-N: the clean mean; SSNI-L: the middle
    of ``[e_min, e_max]``); ``"mu+tau"``: where it gives ``sigmoid(1)`` of it (SSNI-N:
    ``mu + tau``; SSNI-L: ``e_min + 0.73 (e_max - e_min)``); a number: that score norm;
    ``"clean"``: each input's own clean score norm. A reweighting without a calibration
    (a :class:`ssni.reweight.CallableReweight`) falls back to ``"clean"`` unless given a number.
    """
    cal = getattr(reweight, "calibration", None)
    scale = None if cal is None else (getattr(reweight, "tau", None) or cal.std)
    value = _number(target)
    if value is not None:
        return value, scale
    if target not in TARGETS:
        raise ConfigError(f"adaptive attack: score_target = {target!r}; choose one of {list(TARGETS)} "
                          "or a score norm (a number)")
    if target == "clean" or cal is None:
        return None, None
    if isinstance(reweight, LinearReweight):
        share = 0.5 if target == "mu" else SIGMOID_ONE
        return cal.min + share * (cal.max - cal.min), cal.std
    return cal.mean + (0.0 if target == "mu" else scale), scale


@dataclass
class AdaptiveAttack(APGD):
    """A feasible-set attack on ``e(x) <= e_target`` of a :class:`ssni.Defense` with SSNI (module docstring).

    Attributes (besides APGD's; ``loss``, ``restarts``, ``targeted`` work as there and configure the
    unconstrained run too, ``initial_step``, ``momentum``, ``rho`` and ``iterate`` only that run):
        score_target: ``"mu"``, ``"mu+tau"`` (default), ``"clean"`` or a number (:func:`feasible_target`).
        margin: how far inside the boundary a step aims, in units of the scale ``s``.
        tolerance: slack on the constraint when judging an iterate feasible, in units of ``s``.
        feasible_step: first trust-region radius of a feasible-set run, as a share of ``eps``.
        shortlist: feasible iterates per sample re-scored on held-out draws (plus the clean start).
        heldout_draws: fresh draws for that choice.
        unconstrained: also run plain APGD and expose both outputs as ``candidates``.
    """

    score_target: str | float = "mu+tau"
    margin: float = 0.25
    tolerance: float = 0.0
    feasible_step: float = 0.125
    shortlist: int = 3
    heldout_draws: int = 2
    unconstrained: bool = True
    restore_steps: int = 2
    levels: Tensor | None = field(default=None, repr=False)
    score_norms: Tensor | None = field(default=None, repr=False)
    feasible: Tensor | None = field(default=None, repr=False)
    e_target: Tensor | None = field(default=None, repr=False)
    candidates: list[Tensor] = field(default_factory=list, repr=False)
    from_unconstrained: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if (self.margin < 0 or self.tolerance < 0 or not 0 < self.feasible_step <= 1 or self.shortlist < 1
                or self.heldout_draws < 1):
            raise ConfigError("the adaptive attack needs margin >= 0, tolerance >= 0, 0 < feasible_step <= 1, "
                              f"shortlist >= 1 and heldout_draws >= 1, found {self.margin}, {self.tolerance}, "
                              f"{self.feasible_step}, {self.shortlist}, {self.heldout_draws}")
        if _number(self.score_target) is None and self.score_target not in TARGETS:
            raise ConfigError(f"adaptive attack: score_target = {self.score_target!r}; choose one of "
                              f"{list(TARGETS)} or a score norm (a number)")

    def _score_norm(self, model: nn.Module, x_rows: Tensor, ids: Tensor, draws: Tensor) -> Tensor:
        """``e`` with a gradient from the score network alone (no purification), on the draws' noise: the
        differentiable twin of the score norm a defense's pass computes."""
        if not isinstance(model, Defense):
            return model(x_rows, sample_ids=ids, draw=draws, return_score_norm=True)[1]
        s = model.ssni
        noise = model._noise(x_rows, ids, draws, 0)
        with torch.enable_grad():
            return score_norm(s.score_model, s.schedule, resize(x_rows, model.resolution), noise, s.n_levels,
                              model.max_rows, model.purifier.checkpoint)

    def _forward(self, model: nn.Module, x_rows: Tensor, ids: Tensor, draws: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, e)`` of one stacked pass; ``e`` carries a gradient (the pass's own score norm, or its
        value with the gradient of its twin, :meth:`_score_norm`, on the same noise)."""
        logits, e = model(x_rows, sample_ids=ids, draw=draws, return_score_norm=True)
        if e.requires_grad or not isinstance(model, Defense):
            return logits, e
        twin = self._score_norm(model, x_rows, ids, draws)
        return logits, e.detach() + (twin - twin.detach())

    def _eot(self, model: nn.Module, x: Tensor, y: Tensor | None, ids: Tensor) -> Point:
        """EOT estimates at ``x``, ``eot_batch`` draws per stacked pass (row ``j * B + i``: draw ``j`` of
        sample ``i``). With labels ``y``, the defense's passes: ``grad`` and ``loss`` of the attack loss and
        ``c`` from the same pass (and the any-iterate success); with ``y = None``, score-norm passes only
        (``grad`` and ``loss`` are ``None``)."""
        batch, full = x.shape[0], y is not None
        grad, grad_c, losses, cs = torch.zeros_like(x), torch.zeros_like(x), [], []
        for start in range(0, self.eot, self.eot_batch):
            k = min(self.eot_batch, self.eot - start)
            x_var = x.detach().requires_grad_(True)
            draws = model.reserve_draws(k) + torch.arange(k, device=ids.device).repeat_interleave(batch)
            rows, row_ids = x_var.repeat(k, *[1] * (x.dim() - 1)), ids.repeat(k)
            logits, e = (self._forward(model, rows, row_ids, draws) if full
                         else (None, self._score_norm(model, rows, row_ids, draws)))
            c = (e - self.e_target.repeat(k)) / self._scale.repeat(k)
            grad_c += torch.autograd.grad(c.sum(), x_var, retain_graph=full)[0]
            cs.append(c.detach().reshape(k, batch))
            if full:
                adv = LOSSES[self.loss](logits, y.repeat(k), None if self._target is None else self._target.repeat(k))
                grad += torch.autograd.grad(adv.sum(), x_var)[0]
                losses.append(adv.detach().reshape(k, batch))
                self.fooled_any_iterate |= (logits.detach().argmax(1) != y.repeat(k)).reshape(k, batch).any(0)
        return Point(grad / self.eot if full else None, grad_c / self.eot,
                     torch.cat(losses).mean(0) if full else None, torch.cat(cs).mean(0))

    def _estimate(self, model: nn.Module, x: Tensor, y: Tensor, ids: Tensor) -> Point:
        """The defense's EOT estimates at ``x`` (:meth:`_eot`); records the loss trace."""
        point = self._eot(model, x, y, ids)
        self.loss_trace.append(point.loss.mean())  # a tensor: read back once per attack (trace_values)
        return point

    def _constraint(self, model: nn.Module, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """EOT estimates ``(grad c, [B] c)`` at ``x`` from score-norm passes only."""
        point = self._eot(model, x, None, ids)
        return point.grad_c, point.c

    def _restore(self, model: nn.Module, x_try: Tensor, x: Tensor, ids: Tensor, eta: Tensor) -> Tensor:
        """Up to ``restore_steps`` Newton steps on ``c`` alone toward ``c = -margin`` (:func:`newton_restore`),
        each from a fresh score-norm estimate at the point reached."""
        for _ in range(self.restore_steps):
            h, c = self._constraint(model, x_try, ids)
            step = newton_restore(h, (c + self.margin).clamp_min(0), eta, self.threat.norm)
            x_try = self.threat.project(x_try + step, x)
        return x_try

    def _step(self, x_k: Tensor, x: Tensor, p: Point, eta: Tensor) -> Tensor:
        """The trial point: the linear programme's step from ``x_k`` (module docstring), projected."""
        budget = -self.margin - p.c
        if self.threat.norm == "l2":
            return self.threat.project(x_k + l2_step(p.grad, p.grad_c, budget, eta), x)
        lo, hi = trust_box(x_k, x, self.threat.eps, eta)
        return self.threat.project(x_k + linf_step(p.grad, p.grad_c, budget, lo, hi), x)

    def _key(self, p: Point) -> Tensor:
        """The attack loss where the point is feasible on its draws, else ``-inf``."""
        return torch.where(p.c <= self.tolerance, p.loss, -torch.inf)

    def _rank(self, p: Point) -> Tensor:
        """The shortlist's key: the attack loss of a feasible point, above every infeasible one, which rank
        by their violation (so a run that never gets feasible still offers its least infeasible point)."""
        return torch.where(p.c <= self.tolerance, p.loss, -1e6 - p.c)

    def _feasible_run(self, model: nn.Module, x: Tensor, y: Tensor, ids: Tensor, start: Tensor) -> None:
        """One trust-region run from ``start`` (module docstring); its feasible iterates enter the shortlist."""
        x_k, p = start, self._estimate(model, start, y, ids)
        self._remember(x_k, self._rank(p))
        best_x, best, best_key = x_k.clone(), p, self._key(p)
        eta = torch.full_like(p.loss, self.feasible_step * self.threat.eps)
        for _ in range(self.steps):
            x_try = self._restore(model, self._step(x_k, x, p, eta), x, ids, eta)
            trial = self._estimate(model, x_try, y, ids)
            key = self._key(trial)
            self._remember(x_try, self._rank(trial))
            accept = (trial.c <= self.tolerance) | (trial.c < p.c)
            eta = torch.where(accept, (eta * GROW).clamp_max(self.threat.eps), eta / 2)
            better = key > best_key
            best_x, best, best_key = mix(better, x_try, best_x), trial.where(better, best), key.where(better, best_key)
            back = ~accept & best_key.isfinite()  # rejected: back to the best feasible point
            x_k, p = mix(accept, x_try, mix(back, best_x, x_k)), trial.where(accept, best.where(back, p))
            self.step_trace.append(eta.clone())

    def _remember(self, x: Tensor, key: Tensor, slot: int | None = None) -> None:
        """Keep ``x`` in the candidate slot of lowest key when its key is higher (slot 0: the clean start)."""
        rows = torch.arange(x.shape[0], device=x.device)
        if slot is None:
            worst = self._keys[1:].argmin(0) + 1
            take = key > self._keys[worst, rows]
        else:
            worst, take = torch.full_like(rows, slot), torch.ones_like(key, dtype=torch.bool)
        # every row's slot is written, with its old value where not taken: no boolean index, no host read
        self._xs[worst, rows] = mix(take, x.detach(), self._xs[worst, rows])
        self._keys[worst, rows] = torch.where(take, key.detach(), self._keys[worst, rows])

    def _check(self, model: nn.Module) -> nn.Module:
        """A model with SSNI's score norm (a :class:`ssni.Defense` with ``ssni``, or one that speaks its
        interface: ``reserve_draws``, ``ssni.reweight`` and ``return_score_norm``)."""
        if getattr(model, "ssni", None) is None or not hasattr(model, "reserve_draws"):
            raise ConfigError("the adaptive attack needs a Defense with SSNI ([ssni] reweight = 'sigmoid' | "
                              "'linear'); use pgd or apgd for other defenses")
        return model

    def _set_target(self, model: nn.Module, x: Tensor, ids: Tensor) -> None:
        """``e_target`` and ``scale`` per sample; from the clean inputs' score norms where needed."""
        value, scale = feasible_target(model.ssni.reweight, self.score_target)
        clean = None
        if value is None or scale is None:
            first = model.reserve_draws(self.heldout_draws)
            clean = torch.stack([model.explain(x, ids, first + d)["score_norm"]
                                 for d in range(self.heldout_draws)]).mean(0)
        self.e_target = clean if value is None else torch.full((x.shape[0],), value, device=x.device)
        self._scale = (0.05 * self.e_target.abs()).clamp_min(1e-8) if scale is None else \
            torch.full_like(self.e_target, scale)

    def _start(self, x: Tensor, ids: Tensor, restart: int) -> Tensor:
        if restart == 0:
            return x
        ball = ThreatModel(self.threat.norm, self.threat.eps * restart / self.restarts)
        return self.threat.project(ball.random_point(x, SampleNoise.from_ids(self.seed, ids, restart)), x)

    def _plain_apgd(self, model: nn.Module, x: Tensor, y: Tensor, ids: Tensor) -> Tensor:
        """The unconstrained candidate: APGD with this attack's APGD settings."""
        state = {"loss_trace", "step_trace", "fooled_any_iterate", "sample_loss"}
        apgd = APGD(**{f.name: getattr(self, f.name) for f in fields(APGD) if f.init and f.name not in state})
        out = apgd(model, x, y, ids)
        self.fooled_any_iterate |= apgd.fooled_any_iterate
        return out

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None = None) -> Tensor:
        check_images(x)
        model, x = self._check(model), x.detach()
        ids = batch_ids(x, sample_ids)  # on the device the caller keeps them: the seeds are derived there
        self.loss_trace, self.step_trace = [], []
        self.fooled_any_iterate = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        with trusted_images():  # x is checked; iterates are projected into [0, 1]: no per-pass read
            self._set_target(model, x, ids)
            self._xs = x.unsqueeze(0).repeat(self.shortlist + 1, *[1] * x.dim())
            self._keys = torch.full((self.shortlist + 1, x.shape[0]), -torch.inf, device=x.device)
            self._remember(x, torch.zeros(x.shape[0], device=x.device), slot=0)
            try:
                for target in self._targets(model, x, y, ids):
                    self._target = target
                    for restart in range(self.restarts):
                        self._feasible_run(model, x, y, ids, self._start(x, ids, restart))
            finally:
                self._target = None
                self.loss_trace = trace_values(self.loss_trace)
            other = self._plain_apgd(model, x, y, ids) if self.unconstrained else None
            return self._select(getattr(model, "scored", model), y, ids, other)  # chosen on the scored defense

    def _heldout(self, model: nn.Module, x: Tensor, y: Tensor, ids: Tensor,
                 first: int) -> tuple[Tensor, Tensor]:
        """``(score [B], score norms [draws, B])`` on held-out draws: share of misclassified draws,
        ties broken by the mean margin."""
        wrong, margin, norms = 0.0, 0.0, []
        with torch.no_grad():
            for d in range(self.heldout_draws):
                logits, e = model(x, sample_ids=ids, draw=first + d, return_score_norm=True)
                wrong = wrong + (logits.argmax(1) != y).float()
                margin = margin + margin_loss(logits, y, None)
                norms.append(e)
        n = self.heldout_draws
        return wrong / n + 0.01 * torch.tanh(margin / n), torch.stack(norms)

    def _select(self, model: nn.Module, y: Tensor, ids: Tensor, other: Tensor | None = None) -> Tensor:
        """The feasible candidate per sample (module docstring), and the union with ``other``; sets
        ``candidates``, ``from_unconstrained``, ``levels`` and co."""
        first = model.reserve_draws(self.heldout_draws)
        results = [self._heldout(model, cand, y, ids, first) for cand in self._xs]
        scores = torch.stack([s for s, _ in results])  # [K, B]
        norms = torch.stack([e for _, e in results])  # [K, draws, B]
        ok = norms.mean(1) <= self.e_target + self.tolerance * self._scale
        best = torch.where(ok, scores, scores - 10).argmax(0)
        rows = torch.arange(len(y), device=y.device)
        self._describe(model, norms[best, :, rows].T, ok[best, rows])
        chosen = self._xs[best, rows].detach()
        self.candidates, self.from_unconstrained = [chosen], torch.zeros_like(self.feasible)
        if other is None:
            return chosen
        self.candidates.append(other.detach())
        self.from_unconstrained = self._heldout(model, other, y, ids, first)[0] > scores[best, rows]
        return mix(self.from_unconstrained, other, chosen).detach()

    def _describe(self, model: nn.Module, chosen: Tensor, feasible: Tensor) -> None:
        """``levels``, ``score_norms`` and ``feasible`` of the feasible candidate (``chosen``: ``[draws, B]``
        held-out score norms)."""
        self.score_norms, self.feasible = chosen.mean(0), feasible
        if not isinstance(model, Defense):
            self.levels = None
            return
        reweight, top = model.ssni.reweight, model.ssni.schedule.num_levels
        per_draw = [torch.stack([reweight.levels(e, t, top)[0] for e in chosen])
                    for t in model.purifier.t_stars]  # R x [draws, B]
        self.levels = torch.stack(per_draw).float().mean(1)  # [R, B]
