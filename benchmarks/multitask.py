"""Many tasks from one backbone pass: N ResiDual adapters on one batch, against N separate adapted forwards.

    python -m benchmarks.multitask --model ~/.cache/residual-assets/models/dinov2-small-imgfocus --image-size 98

N adapters (``ResiDualConfig(k=64)``, each fitted on its own random images: only speed matters) live on one model.
Per repeat, in turn: one adapted forward with the first adapter active (the yardstick), ``embed_all_adapters`` (one
backbone pass, N readouts) and N forwards with ``set_adapter`` between them (the switches timed too), each through
``embed_images``. It
prints and writes the median wall times, the median ratios to the yardstick of the same repeat, and the largest
difference between ``embed_all_adapters`` and the separate forwards (zero: they are equal bit for bit).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

from peft_residual import ResiDualConfig, embed_all_adapters, embed_images, fit_residual_bases, load_vision_model

from .presets import portable, recorded_command


def separately(model, names: list[str], pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    embeddings = {}
    for name in names:
        model.set_adapter(name)
        embeddings[name] = embed_images(model, pixel_values)
    return embeddings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local directory of a supported model")
    parser.add_argument("--image-size", type=int, default=98)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the measurement used 1)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/multitask_dinov2.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, names = args.image_size, [f"task{i}" for i in range(args.adapters)]
    model = get_peft_model(load_vision_model(args.model), ResiDualConfig(k=64), adapter_name=names[0])
    for seed, name in enumerate(names):
        if seed:
            model.add_adapter(name, ResiDualConfig(k=64, seed=seed))
        model.set_adapter(name)
        generator = torch.Generator().manual_seed(seed)
        reference = [{"pixel_values": torch.randn(64, 3, size, size, generator=generator)} for _ in range(2)]
        fit_residual_bases(model, reference, progress=False)
    pixel_values = torch.randn(args.batch, 3, size, size)

    runs = {
        "one adapted forward": lambda: embed_images(model, pixel_values),
        "embed_all_adapters": lambda: embed_all_adapters(model, pixel_values),
        "separate forwards": lambda: separately(model, names, pixel_values),  # set_adapter switches included
    }
    seconds = {name: [] for name in runs}
    with torch.inference_mode():
        together, alone = embed_all_adapters(model, pixel_values), separately(model, names, pixel_values)
        difference = max(float((together[name] - alone[name]).abs().max()) for name in names)
        for _ in range(args.repeats):
            for name, run in runs.items():
                model.set_adapter(names[0])  # untimed: the yardstick runs the first adapter, already active
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    yardstick = seconds["one adapted forward"]
    rows = []
    for name, times in seconds.items():
        ratio = statistics.median(t / y for t, y in zip(times, yardstick, strict=True))
        rows.append({"run": name, "ms": 1000 * statistics.median(times), "ratio_to_one_forward": ratio})
        print(f"{name:>20}: {rows[-1]['ms']:9.1f} ms  {ratio:6.3f}x one adapted forward")
    print(f"largest difference, embed_all_adapters vs separate forwards: {difference}")
    record = {
        "command": recorded_command("benchmarks.multitask", sys.argv[1:] if argv is None else argv),
        "model": portable(args.model), "image_size": size, "adapters": args.adapters, "batch": args.batch,
        "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "max_abs_difference": difference, "rows": rows,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
