"""Figures of the analyses (matplotlib, an optional dependency: ``pip install "peft-residual[plots]"``)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .errors import ResiDualInputError


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


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    return _save(plt, fig, path)


def dimension_plot(profile: dict, path: str | Path, title: str) -> Path:
    """Intrinsic dimension against depth (see ``analysis.layer_profile``): TwoNN and linear, heads and MLPs."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (estimate, label) in zip(axes, (("two_nn", "TwoNN"), ("linear", "linear (99 % variance)")), strict=True):
        for kind, marker in (("heads", "o"), ("mlp", "s")):
            values = profile[estimate][kind]
            ax.plot(range(len(values)), values, marker=marker, label="heads (mean)" if kind == "heads" else "MLP")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{label} dimension")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def similarity_heatmap(matrix, names: list[str], path: str | Path, title: str, labels: tuple[str, str]) -> Path:
    """A unit x unit spectral similarity matrix (see ``analysis.similarity_matrix``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    step = max(1, len(names) // 12)
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=6)
    ax.set_xlabel(f"units fitted on {labels[1]}")
    ax.set_ylabel(f"units fitted on {labels[0]}")
    fig.colorbar(image, ax=ax, label="spectral similarity")
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)
