"""Inference overhead of a ResiDual-adapted model against the bare base model, in one process, interleaved.

    python -m benchmarks.overhead --model ~/.cache/residual-assets/models/dinov2-small-imgfocus --image-size 98

A first row times two copies of the bare model against each other: the noise floor of the machine. The yardstick
is the base model itself (a deep copy taken before ``get_peft_model``), so the cost of PEFT's wrappers and of
ResiDual's layers is counted, not only the readout; "merged" times ResiDual after ``merge_adapter()``. Per batch
size and configuration it prints the median wall time of the bare model and of the adapted model (alternating calls,
after a warm-up, one thread by default) and the median of the paired ratios (adapted ÷ bare of two adjacent calls),
and writes them to ``--output`` as JSON, with each model's minor page faults per call: glibc's heap can hand a
model fresh pages on every call (each one faulted in and zeroed), which costs time that no profiler row shows.
The bases are fitted on random images: only speed matters.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

from peft_residual import ResiDualConfig, embed_images, fit_residual_bases, load_vision_model

from .presets import portable, recorded_command

CONFIGS = {  # name: (config, whether merge_adapter() folds the scales into the readout before timing)
    "k=64 heads": (ResiDualConfig(k=64), False),
    "ResiDual": (ResiDualConfig.preset("residual"), False),
    "ResiDual, merged": (ResiDualConfig.preset("residual"), True),
}


def interleaved_ms(bare, adapted, pixel_values: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of the bare base model and of the adapted model on the same batch, alternating which goes first,
    and the quartiles of the per-repeat ratios (each ratio compares two adjacent calls, so slow drifts of the
    machine cancel; the quartiles show how far one run's median can be trusted)."""
    timings = {"bare": [], "adapted": []}
    faults = {"bare": 0, "adapted": 0}
    models = {"bare": bare, "adapted": adapted}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                embed_images(model, pixel_values)
        for repeat in range(repeats):
            for name in ("bare", "adapted") if repeat % 2 == 0 else ("adapted", "bare"):
                started, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                embed_images(models[name], pixel_values)
                timings[name].append(time.perf_counter() - started)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted
    ratios = [ours / base for ours, base in zip(timings["adapted"], timings["bare"], strict=True)]
    low, ratio, high = statistics.quantiles(ratios, n=4)
    return {
        "bare_ms": 1000 * statistics.median(timings["bare"]),
        "adapted_ms": 1000 * statistics.median(timings["adapted"]),
        "ratio": ratio,
        "ratio_quartiles": [low, high],
        "page_faults_per_call": {name: count / repeats for name, count in faults.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local directory of a supported model")
    parser.add_argument("--image-size", type=int, default=98)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the measurement used 1)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/overhead_dinov2.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.image_size
    rows = []
    loaded = load_vision_model(args.model)
    first, second = copy.deepcopy(loaded), copy.deepcopy(loaded)
    for batch in args.batch_sizes:  # two bare copies against each other: the machine's noise floor
        timed = interleaved_ms(first, second, torch.randn(batch, 3, size, size), args.repeats)
        rows.append({"config": "bare vs bare", "batch": batch, **timed})
        print(f"bare vs bare  batch {batch:>3}: median paired ratio {timed['ratio']:.3f}")
    del loaded, first, second
    for name, (config, merged) in CONFIGS.items():
        loaded = load_vision_model(args.model)
        # both are copies of one load, so that neither keeps the loader's memory layout (e.g. mapped weights)
        bare, model = copy.deepcopy(loaded), get_peft_model(copy.deepcopy(loaded), config)
        del loaded
        fit_residual_bases(model, [{"pixel_values": torch.randn(64, 3, size, size)} for _ in range(8)], progress=False)
        if merged:
            model.merge_adapter()
        for batch in args.batch_sizes:
            timed = interleaved_ms(bare, model, torch.randn(batch, 3, size, size), args.repeats)
            rows.append({"config": name, "batch": batch, **timed})
            print(f"{name:>16}  batch {batch:>3}: bare {timed['bare_ms']:8.2f} ms  ResiDual {timed['adapted_ms']:8.2f} "
                  f"ms  median paired ratio {timed['ratio']:.3f}  "
                  f"page faults per call {timed['page_faults_per_call']}")  # fmt: skip
    record = {
        "command": recorded_command("benchmarks.overhead", sys.argv[1:] if argv is None else argv),
        "model": portable(args.model),
        "image_size": size,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
