"""An SSNI-aware adaptive attack: fool the classifier *and* lower the score norm.

SSNI injects less noise into inputs whose score norm ``e(x)`` looks clean. An
attacker who knows this can push ``e(x)`` down so that the purifier removes
less of the perturbation. The objective maximised by PGD is

    CE(defense(x), y) - w * (e(x) - mu) / tau

per sample, where ``mu`` and ``tau`` are the calibration's mean and the
reweighting's temperature (its standard deviation for SSNI-L), so ``w = 1``
weighs one standard deviation of clean score norms like one nat of
cross-entropy. The gradient flows exactly through the score network, the
reweighting (straight-through relaxation of the rounding) and the purifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..defense import Defense
from ..errors import ConfigError
from ..score_norm import score_norm
from .pgd import PGD, call_model


@dataclass
class AdaptivePGD(PGD):
    score_weight: float = 1.0

    def objective(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | None) -> Tensor:
        if not isinstance(model, Defense) or model.ssni is None:
            raise ConfigError("the adaptive attack needs a Defense with SSNI")
        ssni = model.ssni
        loss = F.cross_entropy(call_model(model, x, sample_ids), y, reduction="sum")
        noise = model._noise(x, sample_ids, None, 0)
        e = score_norm(ssni.score_model, ssni.schedule, x, noise, ssni.n_levels)
        cal = ssni.reweight.calibration
        scale = getattr(ssni.reweight, "tau", cal.std)
        return loss - self.score_weight * ((e - cal.mean) / scale).sum()
