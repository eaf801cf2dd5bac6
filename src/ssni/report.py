"""Figures and tables rendered from results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def score_norm_histogram(clean: Tensor, adversarial: Tensor, auroc: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = torch.linspace(float(min(clean.min(), adversarial.min())),
                          float(max(clean.max(), adversarial.max())), 40).tolist()
    ax.hist(clean.tolist(), bins=bins, alpha=0.6, label="clean")
    ax.hist(adversarial.tolist(), bins=bins, alpha=0.6, label="adversarial")
    ax.set(xlabel="score norm e(x)", ylabel="images", title=f"Score norms (AUROC {auroc:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def level_histogram(levels: dict[str, Tensor], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, t in levels.items():
        ax.hist(t.flatten().tolist(), bins=30, alpha=0.6, label=name)
    ax.set(xlabel="noise level t*", ylabel="images", title="Noise levels chosen for clean test inputs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def robust_vs_draws_plot(curves: dict[str, dict], path: Path) -> None:
    """Robust accuracy against the number of fresh draws ``n`` (worst of n solid, majority of n
    dashed), one colour per method; ``curves`` maps a method to a summary's ``robust_vs_draws``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, curve) in enumerate(curves.items()):
        colour = f"C{i}"
        ax.plot(curve["draws"], [100 * a for a in curve["worst"]], "o-", color=colour, label=f"{name}: worst of n")
        ax.plot(curve["draws"], [100 * a for a in curve["majority"]], "s--", color=colour, alpha=0.6,
                label=f"{name}: majority of n")
    ax.set(xlabel="fresh draws n", ylabel="robust accuracy (%)", title="Robust accuracy vs number of draws")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_grid(rows: dict[str, Tensor], path: Path) -> None:
    """One row per named batch ``[N, C, H, W]`` in [0, 1] (shown in [0, 1] even if outside)."""
    n = max(r.shape[0] for r in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, (name, batch) in enumerate(rows.items()):
        for i in range(n):
            ax = axes[r][i]
            ax.axis("off")
            if i < batch.shape[0]:
                img = batch[i].detach().clamp(0, 1).permute(1, 2, 0).squeeze(-1)
                ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None, vmin=0, vmax=1)
        axes[r][0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: list[dict]) -> str:
    """The demo table: clean accuracy and robust accuracy under every scoring protocol, each with
    its 95% Wilson interval (worst of N first: the headline), the levels clean inputs get (t* mean,
    std) and the mean level the adversarial examples get (t* adv)."""
    def cell(acc: float, ci: list[float]) -> str:
        return f"{100 * acc:5.1f} [{100 * ci[0]:3.0f},{100 * ci[1]:3.0f}]"

    protocols = ("worst", "majority", "single", "any_iterate")
    header = (f"{'method':<20}{'clean':>17}" + "".join(f"{'robust ' + p:>19}" for p in protocols)
              + f"{'t* mean':>9}{'t* std':>8}{'t* adv':>8}{'seconds':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        by = row["robust_by_protocol"]
        lines.append(f"{row['method']:<20}{cell(row['clean_acc'], row['clean_ci95']):>17}"
                     + "".join(f"{cell(by[p]['acc'], by[p]['ci95']):>19}" for p in protocols)
                     + f"{row['t_mean']:>9.1f}{row['t_std']:>8.1f}{_number(row.get('t_adv_mean')):>8}"
                     + f"{row['seconds']:>9.1f}")
    return "\n".join(lines)
