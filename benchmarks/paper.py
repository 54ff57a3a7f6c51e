"""The paper's protocol as a grid: per model and data set, zero-shot, a linear probe, and ResiDual*, ResiDual and
coarse with their PCA bases fitted on a reference set, λ trained on the target.

    python -m benchmarks.paper      # the paper's models and 10 data sets, bases from ImageNet (needs the Hub)
    python -m benchmarks.paper --models dinov2-s=$ASSETS/models/dinov2-small-imgfocus --image-size 98 \\
        --datasets mnist=$ASSETS/datasets/mnist fashion-mnist=$ASSETS/datasets/fashion-mnist \\
        --references other target --out benchmarks/results/paper_dinov2_offline

``--references`` names where the bases come from, each giving its own ResiDual rows in a cell: ``target`` (the
cell's own training images), ``other`` (the next data set of the grid, the last one's is the first), or
``NAME=DATASET`` (a reference set, e.g. ``imagenet=ILSVRC/imagenet-1k``, whose ``--reference-size`` training images
are drawn). Models and data sets are preset names (:data:`MODELS`, :data:`DATASETS`) or ``NAME=PATH_OR_HUB_ID``.
A cell (one model, one data set) is written to ``OUT/cells/`` when it finishes and skipped when the grid runs
again. Writes ``OUT/paper_grid.{json,md,png}``: one table and one heat map.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from peft_residual import collect_units
from peft_residual.data import load_image_dataset, prepare, sample

from . import methods, run
from .presets import portable, recorded_command
from .report import RESIDUALS, RESULTS, cell_accuracies, environment, grid_table

MODELS = {  # the paper's models, on the Hub (not reachable from the machine that wrote this)
    "clip-b16": {"model": "openai/clip-vit-base-patch16"},
    "clip-l14": {"model": "openai/clip-vit-large-patch14"},
    # OpenCLIP's LAION ViTs, through the transformers CLIPModel weights their Hub repos also hold: the same network as
    # open_clip's (tests/test_libraries.py checks that the two forms give equal units and ResiDual outputs)
    "openclip-b16": {"model": "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"},
    "openclip-l14": {"model": "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"},
    "vit-l16": {"model": "google/vit-large-patch16-224"},
    "dinov2-l": {"model": "facebook/dinov2-large"},
    "blip-l": {"model": "Salesforce/blip-itm-large-flickr"},
}
DATASETS = {  # the paper's 10 target data sets on the Hub (not reachable from the machine that wrote this)
    "gtsrb": {"dataset": "tanganke/gtsrb", "templates": "gtsrb"},
    "mnist": {"dataset": "ylecun/mnist", "templates": "mnist"},
    "cifar10": {"dataset": "uoft-cs/cifar10", "image_column": "img", "templates": "cifar10"},
    "cifar100": {
        "dataset": "uoft-cs/cifar100",
        "image_column": "img",
        "label_column": "fine_label",
        "templates": "cifar100",
    },
    "eurosat": {"dataset": "tanganke/eurosat", "templates": "eurosat"},
    "dtd": {"dataset": "tanganke/dtd", "templates": "dtd"},
    "resisc45": {"dataset": "tanganke/resisc45", "templates": "resisc45"},
    "cars": {"dataset": "tanganke/stanford_cars", "templates": "cars"},
    "sun397": {"dataset": "tanganke/sun397", "templates": "sun397"},
    "svhn": {"dataset": "tanganke/svhn", "templates": "svhn"},
}
REFERENCE = "imagenet=ILSVRC/imagenet-1k"


def named(entries: list[str], presets: dict[str, dict], key: str) -> dict[str, dict]:
    """``NAME=VALUE`` entries (or preset names) as ``{name: settings}``."""
    chosen = {}
    for entry in entries:
        name, _, value = entry.partition("=")
        if not value and name not in presets:
            raise SystemExit(f"{name!r} is neither a preset ({', '.join(presets)}) nor NAME=PATH_OR_HUB_ID")
        chosen[name] = presets[name] if not value else {key: value}
    return chosen


def resolve_references(entries: list[str], datasets: dict[str, dict], target: str) -> dict[str, dict | None]:
    """Per ``--references`` entry, the data set the bases of ``target``'s cell come from (``None``: its own)."""
    order = list(datasets)
    references = {}
    for entry in entries:
        name, _, source = entry.partition("=")
        if name == "target" and not source:
            references[name] = None
        elif name == "other" and not source:
            references[name] = datasets[order[(order.index(target) + 1) % len(order)]]
        elif source:
            references[name] = {"dataset": source}
        else:
            raise SystemExit(f"--references takes target, other or NAME=DATASET, not {entry!r}")
    return references


def reference_units(args: argparse.Namespace, bench: methods.Bench, dataset: dict, model: str):
    """The reference set's training images through the cell's backbone, at the cell's image size."""
    images = sample(load_image_dataset(dataset["dataset"])["train"], args.reference_size, args.data_seed)
    columns = (dataset.get("image_column", "image"), dataset.get("label_column", "label"))
    images = prepare(images, model, args.image_size, *columns)
    return collect_units(methods.load_backbone(model), bench.loader(images), progress=bench.progress, desc="Reference")


def run_cell(args: argparse.Namespace, model: str, dataset: dict, references: dict[str, dict | None]) -> list[dict]:
    """Every method of one (model, data set) cell; ResiDual once per reference."""
    cell = ["--model", model, "--dataset", dataset["dataset"], "--train-size", str(args.train_size)]
    cell += ["--test-size", str(args.test_size), "--max-epochs", str(args.max_epochs), "--seeds", *map(str, args.seeds)]
    for option in ("image_column", "label_column", "templates", "test_split"):
        if option in dataset:
            cell += [f"--{option.replace('_', '-')}", dataset[option]]
    cell += ["--image-size", str(args.image_size)] if args.image_size else []
    cell += ["--no-progress"] if args.no_progress else []
    bench, features = run.build(run.parse_args(cell))
    records = [{"reference": None, **methods.zero_shot(bench, args.seeds[0], features)}]
    records += [{"reference": None, **methods.linear_probe(bench, seed, features)} for seed in args.seeds]
    for name, reference in references.items():
        units = bench.units["train"] if reference is None else reference_units(args, bench, reference, model)
        for method in RESIDUALS:
            records += methods.residual_seeds(bench, args.seeds, method, {"reference": name}, fit_on=units)
    return records


def heat_map(cells: list[dict], references: list[str], path: Path) -> None:
    """ResiDual's mean test accuracy gain over zero-shot, models × data sets, one panel per reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(cell["model"] for cell in cells))
    datasets = list(dict.fromkeys(cell["dataset"] for cell in cells))
    size = (1.2 + 1.6 * len(datasets) * len(references), 1.4 + 0.6 * len(models))
    fig, axes = plt.subplots(1, len(references), figsize=size, squeeze=False)
    gains = {reference: [[float("nan")] * len(datasets) for _ in models] for reference in references}
    for cell in cells:
        zero_shot = cell_accuracies(cell, "zero-shot", None)[0]
        for reference in references:
            residual = cell_accuracies(cell, "residual", reference)
            gain = 100 * (statistics.mean(residual) - zero_shot) if residual else float("nan")
            gains[reference][models.index(cell["model"])][datasets.index(cell["dataset"])] = gain
    reach = max((abs(g) for grid in gains.values() for row in grid for g in row if g == g), default=1.0)
    for ax, reference in zip(axes[0], references, strict=True):
        image = ax.imshow(gains[reference], cmap="RdYlGn", vmin=-reach, vmax=reach)
        for i, row in enumerate(gains[reference]):
            for j, gain in enumerate(row):
                ax.text(j, i, f"{gain:+.1f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
        ax.set_yticks(range(len(models)), models)
        ax.set_title(f"ResiDual − zero-shot (points), bases: {reference}", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="preset names or NAME=PATH_OR_HUB_ID")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), help="preset names or NAME=PATH_OR_HUB_ID")
    parser.add_argument("--references", nargs="+", default=[REFERENCE], help="target, other or NAME=DATASET")
    parser.add_argument("--reference-size", type=int, default=2000, help="reference images the bases are fitted on")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "paper")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    models = named(args.models, MODELS, "model")
    datasets = named(args.datasets, DATASETS, "dataset")
    cells = []
    (args.out / "cells").mkdir(parents=True, exist_ok=True)
    for model_name, model in models.items():
        for dataset_name, dataset in datasets.items():
            path = args.out / "cells" / f"{model_name}__{dataset_name}.json"
            if path.exists():  # finished in an earlier run
                cells.append(json.loads(path.read_text()))
                print(f"{model_name} × {dataset_name}: done earlier, skipped", flush=True)
                continue
            references = resolve_references(args.references, datasets, dataset_name)
            records = run_cell(args, model["model"], dataset, references)
            sources = {
                name: "its own training images" if ref is None else portable(ref["dataset"])
                for name, ref in references.items()
            }
            cell = {"model": model_name, "dataset": dataset_name, "references": sources, "records": records}
            path.write_text(json.dumps(cell, indent=1, default=str))
            cells.append(cell)
    reference_names = [r.partition("=")[0] for r in args.references]
    lines = [
        f"Test accuracy % (mean ± std over seeds {args.seeds}); ResiDual's bases per column from the named reference "
        "(target: the data set's own training images; other: the grid's next data set).",
        "",
        *grid_table(cells, reference_names),
    ]
    payload = {
        "command": recorded_command("benchmarks.paper", argv or sys.argv[1:]),
        "settings": portable({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}),
        "cells": cells,
        "environment": environment(),
    }
    (args.out / "paper_grid.json").write_text(json.dumps(payload, indent=1, default=str))
    (args.out / "paper_grid.md").write_text("\n".join(lines) + "\n")
    heat_map(cells, reference_names, args.out / "paper_grid.png")
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
