"""Reweighting: from a score norm ``e(x)`` to a per-sample noise level (METHOD §3).

With the base method's constant level ``t*``, ``T = t* - 1`` and bias ``b``:

- SSNI-N (sigmoid): ``t(x) = round(sigmoid((e(x) - mu) / tau) * (T + b))``.
  A typical clean input (``e = mu``) gets about half of ``t*``; a far-off one up
  to ``t* + b - 1``.
- SSNI-L (linear): ``t(x) = round((e(x) - e_min) / (e_max - e_min) * T + b)``.

``mu``, ``e_min`` and ``e_max`` come from a :class:`Calibration` on clean
training images. Levels are clipped to ``1..T_max`` (the authors clip the
0-based index ``t - 1`` at 0). By default no level depends on the other
samples of its batch: SSNI-L clips the fraction to ``[0, 1]`` with the
reference range only.

``reference_compat=True`` reproduces the authors' code (``JiachengZ01/SSNI``,
``purifier_clf_models/robust_eval_model.py``): SSNI-L takes ``e_min`` and ``e_max``
over the reference set *and the current batch*, and shifts its whole common-length
grid up by ``b`` before the final jump to 0 (injected at level ``t``, it walks
``ceil(k t / n) + b`` for ``k = n..1``, then 0; at ``t = 20``, ``n = 20``, ``b = 5``:
``25, 24, ..., 7, 6, 0``); SSNI-N runs ``steps + b`` reverse steps. Those grid quirks
are reported by :meth:`Reweight.reverse_plan`.

Default ``tau``: the standard deviation of clean training score norms. The
authors' value could not be read; with ``tau = std``, a clean sample one
standard deviation above the mean gets ``sigmoid(1) = 73%`` of ``T + b``, so the
sigmoid spreads clean inputs over the middle of the range and saturates for
inputs several standard deviations out, which is where adversarial inputs lie
when the score norm separates them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import ConfigError, InputError

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclass(frozen=True)
class Calibration:
    """Statistics of clean reference score norms (from training images)."""

    mean: float
    std: float
    min: float
    max: float
    n: int
    quantiles: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, norms: Tensor, **meta) -> Calibration:
        norms = norms.detach().double().cpu()
        if norms.numel() < 2:
            raise InputError("a calibration needs the score norms of at least 2 reference images")
        q = torch.quantile(norms, torch.tensor(QUANTILES, dtype=torch.float64))
        return cls(mean=norms.mean().item(), std=norms.std().item(), min=norms.min().item(),
                   max=norms.max().item(), n=norms.numel(),
                   quantiles={str(k): v for k, v in zip(QUANTILES, q.tolist())}, meta=meta)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
            raise ConfigError(f"{path} is not a calibration file written by Calibration.save ({err})") from err


class Reweight:
    """Base: map score norms ``e: [B]`` and a base level ``t*`` to levels ``[B]``."""

    bias: int = 0
    reference_compat: bool = False

    def relaxed(self, e: Tensor, t_star: int) -> Tensor:
        """Real-valued level before rounding (differentiable in ``e``)."""
        raise NotImplementedError

    def levels(self, e: Tensor, t_star: int, max_level: int = 1000) -> tuple[Tensor, Tensor]:
        """``(integer levels [B] in 1..max_level, relaxed levels [B])``."""
        relaxed = self.relaxed(e, t_star)
        return relaxed.detach().round().clamp(1, max_level).long(), relaxed

    def reverse_plan(self, t: Tensor) -> tuple[Tensor, int]:
        """``(level each reverse grid starts from [B], extra reverse steps)``; ``(t, 0)`` by default.

        A start above ``t`` shifts the sample's level-``t`` grid up by ``start - t`` (the last
        step still lands on 0); see :meth:`ssni.purifiers.Purifier.purify`.
        """
        return t, 0


class SigmoidReweight(Reweight):
    """SSNI-N: ``round(sigmoid((e - mu) / tau) * (t* - 1 + b))``."""

    def __init__(self, calibration: Calibration, tau: float | None = None, bias: int = 5,
                 reference_compat: bool = False):
        self.calibration, self.bias, self.reference_compat = calibration, bias, reference_compat
        self.tau = calibration.std if tau is None else tau
        if not self.tau > 0:
            raise ConfigError(f"tau must be > 0, found {self.tau}")

    def relaxed(self, e: Tensor, t_star: int) -> Tensor:
        return torch.sigmoid((e - self.calibration.mean) / self.tau) * (t_star - 1 + self.bias)

    def reverse_plan(self, t: Tensor) -> tuple[Tensor, int]:
        return t, self.bias if self.reference_compat else 0


class LinearReweight(Reweight):
    """SSNI-L: ``round((e - e_min) / (e_max - e_min) * (t* - 1) + b)``."""

    def __init__(self, calibration: Calibration, bias: int = 5, reference_compat: bool = False):
        self.calibration, self.bias, self.reference_compat = calibration, bias, reference_compat
        if not calibration.max > calibration.min:
            raise ConfigError("the calibration's max must exceed its min for SSNI-L")

    def relaxed(self, e: Tensor, t_star: int) -> Tensor:
        low, high = self.calibration.min, self.calibration.max
        if self.reference_compat:  # the authors' range also spans the current batch
            low, high = min(low, e.min().item()), max(high, e.max().item())
            fraction = (e - low) / (high - low)
        else:
            fraction = ((e - low) / (high - low)).clamp(0, 1)
        return fraction * (t_star - 1) + self.bias

    def reverse_plan(self, t: Tensor) -> tuple[Tensor, int]:
        # The authors' grid is the level-t grid shifted up by b, then 0 (not a new grid from t + b).
        return (t + self.bias, 0) if self.reference_compat else (t, 0)


class CallableReweight(Reweight):
    """Any user function ``fn(e: [B], t_star: int) -> real levels [B]`` as a reweighting."""

    def __init__(self, fn: Callable[[Tensor, int], Tensor]):
        self.fn = fn

    def relaxed(self, e: Tensor, t_star: int) -> Tensor:
        out = self.fn(e, t_star)
        if not isinstance(out, Tensor) or out.shape != e.shape:
            raise ConfigError("a reweighting function must return a tensor shaped like the score norms")
        return out.to(e.dtype)


# The registry of reweightings: name -> (calibration, tau, bias, reference_compat) -> Reweight.
REWEIGHTS: dict[str, Callable[..., Reweight]] = {
    "sigmoid": lambda cal, tau, bias, compat: SigmoidReweight(cal, tau, bias, compat),  # SSNI-N
    "linear": lambda cal, tau, bias, compat: LinearReweight(cal, bias, compat),  # SSNI-L (no temperature)
}


def make_reweight(kind: str, calibration: Calibration, tau: float | None = None, bias: int = 5,
                  reference_compat: bool = False) -> Reweight:
    """The reweighting registered as ``kind`` (``"sigmoid"``: SSNI-N, ``"linear"``: SSNI-L)."""
    if kind not in REWEIGHTS:
        raise ConfigError(f"unknown reweighting {kind!r}; choose one of {sorted(REWEIGHTS)}")
    return REWEIGHTS[kind](calibration, tau, bias, reference_compat)
