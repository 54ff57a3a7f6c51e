"""The paper's conventions against the alternatives, one factor at a time, on the same units, splits and seeds.

    python -m benchmarks.fidelity --preset dinov2-mnist

Every ResiDual preset runs in the official setting (the norm's mean shared among units, lr 0.8, centroids of the
raw features) and with one change each: each unit centred on its own mean (``ln_mean="unit"``), centroids of the
normalised features (the paper's code), and ``lr="auto"`` (the LR range test). The backbone runs once per split.
Writes benchmarks/results/fidelity_<dataset>.{json,md}.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

from peft_residual import CentroidClassifier, accuracy

from . import methods, run
from .presets import recorded_command
from .report import mean_and_spread, write_study

VARIANTS: dict[str, dict] = {
    "official": {},
    "ln_mean=unit": {"config": {"ln_mean": "unit"}},
    "centroids of normalised features": {"centroid_average": "normalized"},
    'lr="auto"': {"lr": "auto"},
}
PRESETS = ("residual*", "residual", "coarse")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = run.parse_args(argv)
    bench, features = run.build(args)
    names = bench.classifier.class_names
    rows, records = [], []
    for variant, change in VARIANTS.items():
        classifier = bench.classifier
        if "centroid_average" in change:
            if not isinstance(classifier, CentroidClassifier):
                continue  # a zero-shot text head has no centroids to average
            classifier = CentroidClassifier.from_features(
                *features["train"], names, scale=classifier.scale, average=change["centroid_average"]
            )
        variant_bench = dataclasses.replace(bench, classifier=classifier)
        zero_shot = accuracy(classifier(features["test"][0]), features["test"][1])
        rows.append({"variant": variant, "method": "zero-shot", "accuracy": [zero_shot], "epochs": [0], "lr": [None]})
        for preset in PRESETS:
            options = {"lr": change.get("lr", 0.8), **change.get("config", {})}
            runs = methods.residual_seeds(variant_bench, args.seeds, preset, {"variant": variant}, **options)
            records += runs
            rows.append(
                {
                    "variant": variant,
                    "method": preset,
                    "accuracy": [r["test_accuracy"] for r in runs],
                    "epochs": [r["epochs"] for r in runs],
                    "lr": [r["lr"] for r in runs],
                }
            )
    dataset = Path(args.dataset.rstrip("/")).name
    title = f"{Path(args.model.rstrip('/')).name} on {dataset} ({len(bench.train)} train, {len(bench.test)} test)"
    lines = [
        f"### Conventions, one change at a time: {title}",
        "",
        f"Test accuracy %, mean ± std over seeds {args.seeds}; lr is the rate used (the range test's pick for auto).",
        "",
        "| variant | method | test acc. | epochs | lr |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lrs = sorted({f"{lr:.3g}" for lr in row["lr"] if lr is not None}) or ["—"]
        lines.append(
            f"| {row['variant']} | {row['method']} | {mean_and_spread(row['accuracy'])} "
            f"| {statistics.mean(row['epochs']):.1f} | {', '.join(lrs)} |"
        )
    command = recorded_command("benchmarks.fidelity", argv)
    return write_study(args.out, f"fidelity_{dataset.replace('-', '_')}", command, rows, records, lines)


if __name__ == "__main__":
    main()
