"""Golden tests: our purifiers reproduce the reference purification code given the same noise.

The fixtures (``tests/golden/purifiers/``, see ``tests/golden/README.md``) were made
outside this repository by running the reference code (GDMP's ``diff_purify``, Lee &
Kim's GNS ``PurificationForward``, DiffPure's ``RevVPSDE`` under ``torchsde``) with a
closed-form oracle epsilon model for ``x0 ~ N(0, 0.5^2 I)`` and recorded noise. Here
the same noise is fed to our purifiers through :class:`FixedNoise`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ssni.diffusion import VPSchedule, broadcast_to
from ssni.purifiers import GDMP, GNS, DiffPure
from ssni.purifiers.sde import END_LEVEL

from conftest import OracleGaussian

GOLDEN = Path(__file__).parent / "golden" / "purifiers"


def load(name: str) -> dict:
    return torch.load(GOLDEN / name, weights_only=True)


class FixedNoise:
    """Duck-typed :class:`ssni.rng.SampleNoise` that serves recorded tensors.

    ``fixed[(kind, round)]`` is a ``[B, ...]`` tensor (forward jumps) or a dict
    ``level -> [B, ...]`` (per-step noise); ``rows`` are the batch positions served.
    """

    def __init__(self, fixed: dict, rows: torch.Tensor):
        self.fixed, self.rows = fixed, rows

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: torch.Tensor) -> FixedNoise:
        return FixedNoise(self.fixed, self.rows[idx.cpu()])

    def randn(self, key, like, idx=None):
        rows = self.rows if idx is None else self.rows[idx.cpu()]
        return self.fixed[tuple(key)][rows].to(like)

    def randn_levels(self, key, levels, like):
        table = self.fixed[tuple(key)]
        return torch.stack([table[int(lv)][r] for lv, r in zip(levels.tolist(), self.rows.tolist())]).to(like)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def per_level(stack: torch.Tensor, top: int) -> dict:
    """``stack[j]`` belongs to level ``top - j``."""
    return {top - j: z for j, z in enumerate(stack)}


def test_gdmp_rounds_match_the_reference_diff_purify():
    """Two guided rounds at t* = 36 with the reference's quirks (jump to 37, beta variance, clip)."""
    g = load("gdmp_round.pt")
    for rounds, ref in ((1, g["out_round1"]), (2, g["out_round2"])):
        fixed = {}
        for r in range(rounds):
            fixed[("forward", r)] = g[f"forward_{r}"]
            fixed[("guide", r)] = per_level(g[f"guide_{r}"], 36)
            fixed[("reverse", r)] = per_level(g[f"reverse_{r}"], 36)
        gdmp = GDMP(OracleGaussian(0.5), t_star=36, rounds=rounds, guide_scale=60000.0,
                    guide_batch=g["x"].shape[0], reference_compat=True)
        ours = gdmp.purify(g["x"], None, FixedNoise(fixed, torch.arange(4)))
        assert rel_err(ours, ref) < 1e-5


def test_gns_rounds_match_lee_and_kim_purification():
    g = load("gns_round.pt")
    levels = tuple(g["levels"].tolist())
    fixed = {}
    for r, t in enumerate(levels):
        fixed[("forward", r)] = g[f"forward_{r}"]
        fixed[("reverse", r)] = per_level(g[f"reverse_{r}"], t)
    ours = GNS(OracleGaussian(0.5), levels=levels).purify(g["x"], None, FixedNoise(fixed, torch.arange(4)))
    assert rel_err(ours, g["out"].clamp(0, 1)) < 1e-5  # the reference passes it on unclipped


class ContinuousOracle(nn.Module):
    """The oracle with the continuous ``abar(s)``, as DiffPure's score-SDE path evaluates it."""

    def forward(self, x_t, t):
        abar = broadcast_to(VPSchedule().abar_continuous(t.to(x_t.dtype)), x_t)
        return (1 - abar).sqrt() * x_t / (abar * 0.25 + 1 - abar)


def test_diffpure_sde_matches_diffpure_rev_vpsde_under_torchsde():
    """DiffPure at t* = 3: forward jump, then Euler-Maruyama steps s = 0.003 -> 0.002 -> 0.001 -> 1e-5."""
    g = load("diffpure_sde.pt")
    t_star = int(g["t_star"])
    levels = range(t_star, 0, -1)
    dts = torch.tensor([(a - max(a - 1, END_LEVEL)) / 1000 for a in levels])
    assert torch.allclose(dts, g["dt"].float(), rtol=1e-4)  # the reference stepped the same grid
    z = {a: g["dW"][j] / dts[j].sqrt() for j, a in enumerate(levels)}
    fixed = {("forward", 0): g["forward_0"], ("reverse", 0): z}
    p = DiffPure(ContinuousOracle(), t_star=t_star, steps=None, solver="sde")
    ours = p.purify(g["x"], None, FixedNoise(fixed, torch.arange(4)))
    assert rel_err(ours, ((g["out_model_scale"] + 1) / 2).clamp(0, 1)) < 1e-5
