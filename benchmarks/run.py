"""Benchmark ResiDual against zero-shot, LoRA, a linear probe and (optionally) full fine-tuning, in one run on the
same model, data, classifier, splits and seeds. ``residual+head``, ``residual*+head`` and ``lora+head`` train a
linear head together with the adapter (``lora+head``: PEFT's image-classification recipe, LoRA on q,v).

    python -m benchmarks.run --preset dinov2-fashion-mnist
    python -m benchmarks.run --model openai/clip-vit-base-patch32 --dataset uoft-cs/cifar10 --image-column img \\
        --templates cifar10

Writes benchmarks/results/<name>.json (records, summary, machine, versions, command), <name>.md and two PNG plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from peft_residual import PRESETS as RESIDUAL_PRESETS
from peft_residual import base_embeddings, collect_units, default_classifier, embed_batches, holdout
from peft_residual.data import class_names, load_image_dataset, prepare, sample

from . import methods, report
from .presets import PRESETS, portable, recorded_command

RESULTS = report.RESULTS
ALL_METHODS = [
    "zero-shot", "residual*", "residual", "residual*+head", "residual+head", "coarse", "lora-qv", "lora+head",
    "lora-all", "linear-probe", "full-finetune",
]  # fmt: skip
CHEAP = {"zero-shot", "residual*", "residual", "residual*+head", "residual+head", "coarse", "linear-probe"}
QUICK = {"train_size": 300, "test_size": 200, "max_epochs": 8, "seeds": [0, 1, 2], "lora_seeds": [0]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="named model/dataset setup (see benchmarks/presets.py)"
    )
    parser.add_argument("--model", help="Hub id or local directory of the vision model")
    parser.add_argument("--dataset", help="Hub id or local save_to_disk directory of a labelled image data set")
    parser.add_argument("--image-column", default=None, help="image column (default: image)")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default=None, help="default: test")
    parser.add_argument("--templates", default=None, help="template set or file for CLIP zero-shot (default: imagenet)")
    parser.add_argument("--image-size", type=int, default=None, help="resize images to this square side")
    parser.add_argument("--train-size", type=int, default=600, help="images drawn for training + validation")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="the first part of the drawn images")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--data-seed", type=int, default=0, help="seed drawing the images (shared by all methods)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the cheap methods")
    parser.add_argument("--lora-seeds", type=int, nargs="+", default=[0], help="seeds of LoRA and full fine-tuning")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None)
    parser.add_argument("--full-finetune", action="store_true", help="also fine-tune the whole vision tower")
    parser.add_argument("--end-to-end", action="store_true", help="train ResiDual through the backbone, no cache")
    parser.add_argument(
        "--head-lr", type=float, default=methods.HEAD_LR, help="the head's rate in the +head ResiDual methods"
    )
    parser.add_argument("--basis-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"small run: {QUICK}")
    parser.add_argument("--name", help="output name (default: derived from model, dataset and sizes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    args.model = args.model or preset.get("model")
    args.dataset = args.dataset or preset.get("dataset")
    args.image_column = args.image_column or preset.get("image_column", "image")
    args.test_split = args.test_split or preset.get("test_split", "test")
    args.templates = args.templates or preset.get("templates", "imagenet")
    args.image_size = args.image_size or preset.get("image_size")
    if not args.model or not args.dataset:
        parser.error("give --preset, or both --model and --dataset")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.methods is None:
        args.methods = [m for m in ALL_METHODS if m != "full-finetune" or args.full_finetune]
    return args


def build(args: argparse.Namespace) -> tuple[methods.Bench, dict]:
    """Draw the splits, load the model and build the frozen classifier once for every method."""
    started = time.perf_counter()
    dataset = load_image_dataset(args.dataset)
    train, val = holdout(sample(dataset[args.train_split], args.train_size, args.data_seed), args.val_fraction)
    splits = {"val": val, "train": train, "test": sample(dataset[args.test_split], args.test_size, args.data_seed)}
    names = class_names(splits["train"], args.label_column)
    splits = {
        key: prepare(split, args.model, args.image_size, args.image_column, args.label_column)
        for key, split in splits.items()
    }
    model = methods.load_backbone(args.model)
    bench = methods.Bench(
        args.model, splits["train"], splits["val"], splits["test"], classifier=None, batch_size=args.batch_size,
        max_epochs=args.max_epochs, patience=args.patience, workers=args.workers, progress=not args.no_progress,
        basis_dtype=args.basis_dtype, head_lr=args.head_lr,
    )  # fmt: skip
    # One backbone pass per split: its unit pieces serve every ResiDual variant, the base features (their sum) the
    # zero-shot score and the centroids. The train and validation images also go through a plain frozen forward,
    # timed batch by batch alongside their unit pass (after one untimed warm-up batch; two passes timed minutes apart
    # differed by 10-20 % on this shared 2-core machine): that is the yardstick of the totals, and the linear probe's
    # own encoding. Which of these passes each method pays for is decided in methods.encoding_seconds.
    embed_batches(model, [next(iter(bench.loader(splits["val"])))], base=True, progress=False)  # untimed warm-up
    bench.units, bench.encode_seconds, bench.frozen_seconds, features = {}, {}, {}, {}
    for key, split in splits.items():
        started_split = time.perf_counter()
        frozen = FrozenAlongside(model, bench.loader(split)) if key in methods.CHARGED_SPLITS else None
        bench.units[key] = collect_units(
            model, frozen or bench.loader(split), progress=bench.progress, desc=f"Units ({key})"
        )
        bench.encode_seconds[key] = time.perf_counter() - started_split
        if frozen is not None:
            bench.encode_seconds[key] -= frozen.forward_seconds
            bench.frozen_seconds[key] = frozen.loading_seconds + frozen.forward_seconds
        features[key] = base_embeddings(bench.units[key])
    bench.classifier = default_classifier(
        model, names, tokenizer_source=args.model, templates=args.templates, train_features=features["train"]
    )
    print(f"setup: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test images, "
          f"{len(names)} classes, {time.perf_counter() - started:.0f} s")  # fmt: skip
    return bench, features


class FrozenAlongside:
    """The batches of a loader, each also run through the plain frozen model: :attr:`forward_seconds` times those
    forwards and :attr:`loading_seconds` the loading, which both passes need."""

    def __init__(self, model: torch.nn.Module, batches) -> None:
        self.model, self.batches = model, batches
        self.forward_seconds = self.loading_seconds = 0.0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.batches)
        for step in range(len(self.batches)):
            started = time.perf_counter()
            batch = next(batches)
            self.loading_seconds += time.perf_counter() - started
            if step % 2 == 0:  # the two passes take turns going first, so neither gains from the other's warm caches
                self._forward(batch)
            yield batch
            if step % 2 == 1:
                self._forward(batch)

    def _forward(self, batch: dict) -> None:
        started = time.perf_counter()
        embed_batches(self.model, [batch], base=True, progress=False)
        self.forward_seconds += time.perf_counter() - started


def run_method(bench: methods.Bench, method: str, seed: int, features: dict, end_to_end: bool) -> dict:
    if method == "zero-shot":
        return methods.zero_shot(bench, seed, features)
    if method in RESIDUAL_PRESETS:
        return methods.residual(bench, seed, method, end_to_end)
    if method.removesuffix(methods.HEAD_SUFFIX) in RESIDUAL_PRESETS:  # the same cache, a linear head trained too
        return methods.residual(bench, seed, method.removesuffix(methods.HEAD_SUFFIX), end_to_end, head="linear")
    if method == "lora" + methods.HEAD_SUFFIX:  # PEFT's recipe: LoRA q,v and a linear head in the same loop
        return methods.lora(bench, seed, "qv", features)
    if method.startswith("lora-"):
        return methods.lora(bench, seed, method.removeprefix("lora-"))
    if method == "linear-probe":
        return methods.linear_probe(bench, seed, features)
    return methods.full_finetune(bench, seed)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.data_seed)
    bench, features = build(args)
    records = []
    for method in ["zero-shot"] + [m for m in args.methods if m != "zero-shot"]:
        seeds = [args.seeds[0]] if method == "zero-shot" else args.seeds if method in CHEAP else args.lora_seeds
        for seed in seeds:
            started = time.perf_counter()
            record = run_method(bench, method, seed, features, args.end_to_end)
            record["wall_s"] = time.perf_counter() - started
            records.append(record)
            print(f"{method:>14} seed {seed}: test acc {100 * record['test_accuracy']:.1f}%  "
                  f"({record['wall_s']:.0f} s, {record['epochs']} epochs)", flush=True)  # fmt: skip
    name = args.name or "_".join(
        [Path(args.model.rstrip("/")).name, Path(args.dataset.rstrip("/")).name, f"n{args.train_size}"]
    )
    payload = {
        "command": recorded_command("benchmarks.run", argv or sys.argv[1:]),
        "settings": portable({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}),
        "records": records,
        "frozen_forward_train_s": bench.frozen_seconds["train"],
        "encode_seconds": bench.encode_seconds,
        "frozen_seconds": bench.frozen_seconds,
    }
    title = f"{Path(args.model.rstrip('/')).name} on {Path(args.dataset.rstrip('/')).name} ({len(bench.train)} train)"
    outputs = report.write(args.out, name, payload, title)
    print(outputs["markdown"].read_text())
    print("wrote", *map(str, outputs.values()))
    return {"records": records, "outputs": outputs}


if __name__ == "__main__":
    main()
