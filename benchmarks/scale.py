"""The user path at growing data set sizes: one backbone pass, fit, cache and training, with memory and disk.

    python -m benchmarks.scale --images 3000 30000 300000 --synthetic-from 300000 --two-processes 30000

A randomly initialised CLIP ViT-B/32-shaped vision model (hidden 768, 12 layers, 12 heads, projection 512) at 64 px,
``ResiDualConfig(k=64)``, random images and labels (speed and memory only: the accuracy means nothing), 10% more
images for validation. Each size runs in its own process, as a user would: ``collect_units`` over the training and
validation images (the one backbone pass), ``fit_residual_bases`` and ``train_residual`` (two epochs) on those units,
with a memory budget of ``--budget-mib`` for the unit store and for the training cache alike, so that both go to
disk beyond it. Per phase it records seconds per 1,000 images and the process's peak RSS so far; it also records
the disk used. ``--two-processes`` runs sizes again under ``accelerate launch`` with two processes, each recording
its share of the images (``collect_units(..., accelerator=)``) and caching its part; it records every process's
peak RSS. Writes benchmarks/results/scale_clip_b32_random.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from peft import get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from peft_residual import (
    Classifier,
    ResiDualConfig,
    UnitStore,
    collect_units,
    default_accelerator,
    fit_residual_bases,
    train_residual,
)
from peft_residual.records import UnitRecord
from peft_residual.tuner import residual_tuner

from .measure import PeakRSS
from .report import environment

CLASSES = 10


def batches(images: int, seed: int, batch_size: int = 250):
    """Random 64 px images and labels, made batch by batch (the data set itself never sits in memory)."""
    for start in range(0, images, batch_size):
        size = min(batch_size, images - start)
        generator = torch.Generator().manual_seed(seed * 10_000_019 + start)
        yield {
            "pixel_values": torch.randn(size, 3, 64, 64, generator=generator),
            "label": torch.randint(0, CLASSES, (size,), generator=generator),
        }


def synthetic_units(model, images: int, seed: int, budget: int, batch_size: int = 250) -> UnitStore:
    """A unit store of random pieces and labels, as if the backbone had run: for sizes it is too slow for here."""
    store = UnitStore(residual_tuner(model).arch, budget)
    for start in range(0, images, batch_size):
        size = min(batch_size, images - start)
        generator = torch.Generator().manual_seed(seed * 10_000_019 + start)
        pieces = torch.randn(size, *store.piece_shape, generator=generator)
        store.add(UnitRecord.from_pieces(pieces), torch.randint(0, CLASSES, (size,), generator=generator))
    store.image_size = (64, 64)
    return store


def disk_bytes(directory: Path | None) -> int:
    if directory is None or not directory.exists():
        return 0
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def measure(images: int, budget: int, synthetic: bool, work_dir: Path) -> dict | None:
    """One row, in this process (or in each process of an ``accelerate launch``); the main process returns it."""
    torch.manual_seed(0)
    accelerator = default_accelerator()
    model = get_peft_model(CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=64)).eval(), ResiDualConfig(k=64))
    classifier = Classifier(torch.randn(CLASSES, 512), 100.0, [str(c) for c in range(CLASSES)])
    seconds, peak = {}, {}
    cache_dir = work_dir / "cache"
    with PeakRSS() as rss:
        started = time.perf_counter()
        if synthetic:
            train_units = synthetic_units(model, images, seed=0, budget=budget)
            val_units = synthetic_units(model, images // 10, seed=1, budget=budget)
        else:  # each process records its share of the batches
            train_units, val_units = (
                collect_units(model, batches(size, seed), budget, progress=False, accelerator=accelerator)
                for size, seed in ((images, 0), (images // 10, 1))
            )
        seconds["pass"], peak["pass"] = time.perf_counter() - started, rss.mib
        started = time.perf_counter()
        fit_residual_bases(model, train_units)
        seconds["fit"], peak["fit"] = time.perf_counter() - started, rss.mib
        result = train_residual(
            model, classifier, train_units, val_units, max_epochs=2, patience=2, max_cache_bytes=budget,
            cache_dir=cache_dir, accelerator=accelerator, progress=False,
        )  # fmt: skip
        seconds["cache"], seconds["train"] = result.seconds["cache"], result.seconds["train"] / result.epochs_run
        peak["train"] = rss.mib
    store_bytes = disk_bytes(train_units.spill_directory) + disk_bytes(val_units.spill_directory)
    per_process = gather_object([{"peak_rss_mib": rss.mib, "peak_rss_mib_after": peak, "unit_store": store_bytes}])
    if not accelerator.is_main_process:
        return None
    encoded = images + images // 10  # the pass and the cache cover both splits; fit and epochs the training images
    per_thousand = {
        "pass": 1000 * seconds["pass"] / encoded,
        "fit": 1000 * seconds["fit"] / images,
        "cache": 1000 * seconds["cache"] / encoded,
        "train_epoch": 1000 * seconds["train"] / images,
    }
    disk = {"unit_store": sum(p["unit_store"] for p in per_process), "training_cache": disk_bytes(cache_dir)}
    return {
        "images": images, "validation_images": images // 10, "processes": accelerator.num_processes,
        "torch_threads": torch.get_num_threads(), "budget_bytes": budget, "synthetic_units": synthetic,
        "cache_location": result.cache_location, "store_spilled": train_units.spilled,
        "seconds_per_1k": per_thousand, "peak_rss_mib_after": peak,
        "peak_rss_mib": max(p["peak_rss_mib"] for p in per_process),
        "peak_rss_mib_per_process": [p["peak_rss_mib"] for p in per_process], "disk_bytes": disk,
    }  # fmt: skip


def run_row(images: int, processes: int, args: argparse.Namespace) -> dict:
    """One row in fresh processes, as a user would run it."""
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    with tempfile.TemporaryDirectory(prefix="residual-scale-") as work_dir:
        command = [*launch, "-m", "benchmarks.scale", "--only", str(images), "--budget-mib", str(args.budget_mib)]
        command += ["--work-dir", work_dir]
        command += ["--synthetic-from", str(args.synthetic_from)] if args.synthetic_from else []
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="*", default=[3000, 30000])
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument(
        "--synthetic-from", type=int, help="from this size on, random unit pieces stand in for the backbone pass"
    )
    parser.add_argument(
        "--two-processes", type=int, nargs="*", default=[], help="sizes to run again with 2 processes (accelerate)"
    )
    parser.add_argument("--only", type=int, help="measure one size in this process and print its JSON")
    parser.add_argument("--work-dir", type=Path, help="with --only: where the caches go (shared by the processes)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--update", action="store_true", help="replace only the rows measured now in the results file, keep the rest"
    )
    args = parser.parse_args(argv)
    budget = args.budget_mib * 2**20
    if args.only:
        record = measure(args.only, budget, args.only >= (args.synthetic_from or float("inf")), args.work_dir)
        if record is not None:
            print(json.dumps(record))
        return
    records = []
    for images, processes in [*((n, 1) for n in args.images), *((n, 2) for n in args.two_processes)]:
        records.append(run_row(images, processes, args))
        print(json.dumps(records[-1]), flush=True)
    command = "python -m benchmarks.scale " + " ".join(argv or sys.argv[1:])
    path = args.output / "scale_clip_b32_random.json"
    payload = {"command": command, "records": records, "environment": environment()}
    if args.update:  # the earlier rows stay, each with the command that measured it
        earlier = json.loads(path.read_text())
        new_rows = {(r["images"], r["processes"]) for r in records}
        kept = [r for r in earlier["records"] if (r["images"], r["processes"]) not in new_rows]
        for record in kept:
            record.setdefault("command", earlier["command"])
        for record in records:
            record["command"] = command
        payload = {**earlier, "records": kept + records, "command": earlier["command"]}
    args.output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
