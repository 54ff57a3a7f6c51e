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

It also counts the aten ops of one batch-1 forward (bare, and each configuration live and merged) with
:func:`benchmarks.opcount.count_ops`, which leaves out metadata-only ops (views, ``detach``: see
``benchmarks.opcount.METADATA_ONLY``): on a GPU at batch 1 each op is about one kernel launch, and launches, not
arithmetic, set the time. ``--ops-only`` counts without timing (about a minute on 2 CPU cores) and writes the counts
into the record at ``--output``, keeping any timings already there. ``--device cuda`` moves both models to the GPU
and times with ``torch.cuda.synchronize()`` around every call (record: ``overhead_dinov2_cuda.json``).

    python -m benchmarks.overhead --model ~/.cache/residual-assets/models/dinov2-small-imgfocus --ops-only
    python -m benchmarks.overhead --model ~/.cache/residual-assets/models/dinov2-small-imgfocus --device cuda
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

from .opcount import METADATA_ONLY, count_ops
from .presets import portable, recorded_command

CONFIGS = {  # name: (config, whether merge_adapter() folds the scales into the readout before timing)
    "k=64 heads": (ResiDualConfig(k=64), False),
    "k=64 heads, merged": (ResiDualConfig(k=64), True),
    "ResiDual": (ResiDualConfig.preset("residual"), False),
    "ResiDual, merged": (ResiDualConfig.preset("residual"), True),
}


# ops per forward: each configuration, live and merged (the merged form is what inference should run)
OP_CONFIGS = {"k=64 heads": ResiDualConfig(k=64), "ResiDual": ResiDualConfig.preset("residual")}


def synchronizer(device: torch.device):
    """What to call before reading the clock: wait for the device's queued kernels (a no-op on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def interleaved_ms(bare, adapted, pixel_values: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of the bare base model and of the adapted model on the same batch, alternating which goes first,
    and the quartiles of the per-repeat ratios (each ratio compares two adjacent calls, so slow drifts of the
    machine cancel; the quartiles show how far one run's median can be trusted). On a GPU the clock is read after
    ``torch.cuda.synchronize()``, so each time covers the call's kernels, not only their launch."""
    sync = synchronizer(pixel_values.device)
    timings = {"bare": [], "adapted": []}
    faults = {"bare": 0, "adapted": 0}
    models = {"bare": bare, "adapted": adapted}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                embed_images(model, pixel_values)
        for repeat in range(repeats):
            for name in ("bare", "adapted") if repeat % 2 == 0 else ("adapted", "bare"):
                sync()
                started, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                embed_images(models[name], pixel_values)
                sync()
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


def fitted(loaded: torch.nn.Module, config: ResiDualConfig, size: int, device: torch.device) -> torch.nn.Module:
    """A deep copy of ``loaded`` adapted with ``config`` on ``device``, its bases fitted on random images."""
    model = get_peft_model(copy.deepcopy(loaded), config).to(device)
    fit_residual_bases(model, [{"pixel_values": torch.randn(64, 3, size, size)} for _ in range(8)], progress=False)
    return model


def forward_ops(model: torch.nn.Module, pixel_values: torch.Tensor) -> dict[str, int]:
    """The aten ops of one inference forward (``embed_images``), by name, less the metadata-only ones."""
    with torch.no_grad():
        embed_images(model, pixel_values)  # a first call may build what later calls reuse
    return dict(sorted(count_ops(embed_images, model, pixel_values).items()))


def op_counts(model_path: str, size: int, device: torch.device) -> list[dict]:
    """Aten ops of one batch-1 forward: the bare model's, and each of :data:`OP_CONFIGS` live and merged."""
    torch.manual_seed(0)
    loaded = load_vision_model(model_path)
    x = torch.randn(1, 3, size, size, device=device)
    bare = forward_ops(copy.deepcopy(loaded).to(device), x)
    rows = [{"config": "bare", "form": "", "by_op": bare}]
    for name, config in OP_CONFIGS.items():
        model = fitted(loaded, config, size, device)
        rows.append({"config": name, "form": "live", "by_op": forward_ops(model, x)})
        model.merge_adapter()
        rows.append({"config": name, "form": "merged", "by_op": forward_ops(model, x)})
    for row in rows:
        row["ops"] = sum(row["by_op"].values())
        row["ratio"] = row["ops"] / rows[0]["ops"]
        extra = {op: n - bare.get(op, 0) for op, n in row["by_op"].items() if n != bare.get(op, 0)}
        label = f"{row['config']}, {row['form']}" if row["form"] else row["config"]
        beyond = f"  beyond bare: {dict(sorted(extra.items(), key=lambda kv: -kv[1]))}" if row["form"] else ""
        print(f"{label:>20}: {row['ops']:4d} aten ops per batch-1 forward, {row['ratio']:.3f}x bare{beyond}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local directory of a supported model")
    parser.add_argument("--image-size", type=int, default=98)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the measurement used 1)")
    parser.add_argument("--device", default="cpu", help="where both models run, e.g. cuda (timed with synchronize)")
    parser.add_argument("--ops-only", action="store_true", help="count aten ops per forward only, no timing")
    parser.add_argument(
        "--output", type=Path, help="JSON record (default benchmarks/results/overhead_dinov2.json, _cuda on a GPU)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    output = args.output or Path(f"benchmarks/results/overhead_dinov2{suffix}.json")
    command = recorded_command("benchmarks.overhead", sys.argv[1:] if argv is None else argv)
    size = args.image_size
    ops = {
        "command": command,
        "batch": 1,
        "device": device_name(device),
        "torch": torch.__version__,
        "excluded": sorted(METADATA_ONLY),
        "rows": op_counts(args.model, size, device),
    }
    if args.ops_only:  # keep the timings of the record already there, if it is one of this model at this size
        record = json.loads(output.read_text()) if output.exists() else {}
        if (record.get("model"), record.get("image_size")) != (portable(args.model), size):
            record = {"command": command, "model": portable(args.model), "image_size": size}
        record["ops"] = ops
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=2) + "\n")
        return
    torch.manual_seed(0)
    rows = []
    loaded = load_vision_model(args.model)
    first, second = copy.deepcopy(loaded).to(device), copy.deepcopy(loaded).to(device)
    for batch in args.batch_sizes:  # two bare copies against each other: the machine's noise floor
        timed = interleaved_ms(first, second, torch.randn(batch, 3, size, size, device=device), args.repeats)
        rows.append({"config": "bare vs bare", "batch": batch, **timed})
        print(f"bare vs bare  batch {batch:>3}: median paired ratio {timed['ratio']:.3f}")
    del loaded, first, second
    for name, (config, merged) in CONFIGS.items():
        loaded = load_vision_model(args.model)
        # both are copies of one load, so that neither keeps the loader's memory layout (e.g. mapped weights)
        bare, model = copy.deepcopy(loaded).to(device), fitted(loaded, config, size, device)
        del loaded
        if merged:
            model.merge_adapter()
        for batch in args.batch_sizes:
            timed = interleaved_ms(bare, model, torch.randn(batch, 3, size, size, device=device), args.repeats)
            rows.append({"config": name, "batch": batch, **timed})
            print(f"{name:>16}  batch {batch:>3}: bare {timed['bare_ms']:8.2f} ms  ResiDual {timed['adapted_ms']:8.2f} "
                  f"ms  median paired ratio {timed['ratio']:.3f}  "
                  f"page faults per call {timed['page_faults_per_call']}")  # fmt: skip
    record = {
        "command": command,
        "model": portable(args.model),
        "image_size": size,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "device": device_name(device),
        "rows": rows,
        "ops": ops,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
