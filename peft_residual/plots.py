"""Figures of the analyses (matplotlib, an optional dependency: ``pip install "peft-residual[plots]"``)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .tuner.errors import ResiDualInputError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ResiDualInputError(
            'Plots need matplotlib: pip install "peft-residual[plots]" (or matplotlib itself).'
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ranking_plot(curves: dict, path: str | Path, title: str) -> Path:
    """Accuracy against the fraction of heads kept, one line per criterion and ablation (see ``ranking_curves``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    fractions = curves["fractions"]
    for ax, ablation in zip(axes, ("zero", "mean"), strict=True):
        for criterion, by_ablation in curves["curves"].items():
            runs = [by_ablation[ablation][str(f)] for f in fractions]
            means = [100 * statistics.mean(r) for r in runs]
            spread = [100 * statistics.stdev(r) if len(r) > 1 else 0.0 for r in runs]
            ax.errorbar([100 * f for f in fractions], means, yerr=spread, marker="o", capsize=3, label=criterion)
        ax.axhline(100 * curves["full_accuracy"], color="black", linestyle="--", label="full model")
        ax.axhline(100 * curves["all_heads"][ablation], color="grey", linestyle=":", label="all heads")
        ax.set_xscale("log")
        ax.set_xlabel("heads kept (% of all, log)")
        ax.set_title(f"{ablation}-ablating the rest", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
