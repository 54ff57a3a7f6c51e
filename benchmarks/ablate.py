"""Ablations of ResiDual, one factor at a time from the paper's ResiDual (heads and MLPs, all components, λ₀ =
1 + N(0, 1), bases fitted on the task's training images), on the same units, splits and seeds:

- k: 4, 16, 64 components, or the fewest reaching 50 / 90 / 99 % of the variance, or all;
- units: heads, MLPs, both;
- bases: fitted on the task's training images, or on another data set's (``--other-dataset``);
- λ₀: ones, 1 + N(0, 1), the eigenvalues over their mean.

    python -m benchmarks.ablate --preset dinov2-fashion-mnist --other-dataset ~/.cache/residual-assets/datasets/mnist

Writes benchmarks/results/ablate_<dataset>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from peft_residual import collect_units
from peft_residual.data import load_image_dataset, prepare, sample

from . import methods, run
from .presets import recorded_command
from .report import mean_and_spread, write_study

FACTORS: dict[str, dict[str, dict]] = {
    "k": {str(k): {"k": k} for k in (4, 16, 64, 0.5, 0.9, 0.99)} | {"all": {"k": None}},
    "units": {"heads": {"units": "heads"}, "MLPs": {"units": "mlps"}, "both": {"units": "heads+mlps"}},
    "bases": {"this data set": {}, "other data set": {"fit_on": "other"}},
    "λ₀": {"ones": {"lambda_init": "ones"}, "1 + N(0, 1)": {"lambda_init": "randn"}, "eigen": {"lambda_init": "eigen"}},
}


def _other_units(args: argparse.Namespace, bench: methods.Bench):
    """The other data set's training images (as many as this run draws) through the same backbone."""
    dataset = load_image_dataset(args.other_dataset)
    images = sample(dataset[args.train_split], len(bench.train), args.data_seed)
    images = prepare(images, args.model, args.image_size, args.image_column, args.label_column)
    model = methods.load_backbone(args.model)
    return collect_units(model, bench.loader(images), progress=bench.progress, desc="Units (other data set)")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FACTORS), figsize=(4 * len(FACTORS), 3.6), sharey=True)
    for ax, factor in zip(axes, FACTORS, strict=True):
        chosen = [r for r in rows if r["factor"] == factor]
        means = [100 * statistics.mean(r["accuracy"]) for r in chosen]
        spread = [100 * statistics.stdev(r["accuracy"]) if len(r["accuracy"]) > 1 else 0 for r in chosen]
        ax.bar([r["level"] for r in chosen], means, yerr=spread, capsize=3)
        ax.set_title(factor)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("test accuracy (%)")
    lowest = min(100 * min(r["accuracy"]) for r in rows)
    axes[0].set_ylim(max(0, lowest - 10), None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--other-dataset", help="fit the bases on this data set's training images for 'bases'")
    known, rest = extra.parse_known_args(argv)
    args = run.parse_args(rest)
    args.other_dataset = known.other_dataset
    bench, _ = run.build(args)
    other = _other_units(args, bench) if args.other_dataset else None
    rows, records = [], []
    for factor, levels in FACTORS.items():
        for level, change in levels.items():
            change = dict(change)
            if change.pop("fit_on", None):
                if other is None:
                    continue
                change["fit_on"] = other
            runs = methods.residual_seeds(bench, args.seeds, "residual", {"factor": factor, "level": level}, **change)
            records += runs
            rows.append(
                {
                    "factor": factor,
                    "level": level,
                    "accuracy": [r["test_accuracy"] for r in runs],
                    "scales": runs[0]["trainable_params"],
                    "epochs": [r["epochs"] for r in runs],
                }
            )
    dataset = Path(args.dataset.rstrip("/")).name
    title = f"ResiDual ablations: {Path(args.model.rstrip('/')).name} on {dataset} ({len(bench.train)} train)"
    if other is not None:
        title += f", other bases from {Path(args.other_dataset.rstrip('/')).name}"
    lines = [
        f"### {title}",
        "",
        f"Test accuracy % over seeds {args.seeds} (mean ± std); every row changes one factor of ResiDual (heads and "
        "MLPs, all components, λ₀ = 1 + N(0, 1), bases from this data set).",
        "",
        "| factor | level | test acc. | trainable scales | epochs |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['factor']} | {row['level']} | {mean_and_spread(row['accuracy'])} | {row['scales']:,} "
            f"| {statistics.mean(row['epochs']):.1f} |"
        )
    for record in records:
        record.pop("fit_on", None)
    name = f"ablate_{dataset.replace('-', '_')}"
    command = recorded_command("benchmarks.ablate", argv)
    payload = write_study(args.out, name, command, rows, records, lines)
    plot(rows, args.out / f"{name}.png", title)
    return payload


if __name__ == "__main__":
    main()
