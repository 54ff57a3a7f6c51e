"""Eager against ``torch.compile`` of the bare model and of the merged ResiDual model, on one device.

    python -m benchmarks.compiled --model ~/.cache/residual-assets/models/dinov2-small-imgfocus --device cuda

On a GPU the default mode, ``reduce-overhead``, is the inference path the docs name: inductor's kernels replayed as
a CUDA graph, so a batch-1 forward costs one launch instead of one per op. Per model and batch size it checks that
the compiled embedding equals eager (largest absolute difference recorded), counts the graphs inductor did not
capture (``cudagraph_skips``: a CPU tensor or a mutated input in the graph), and times the median ms of eager and
compiled calls (``torch.cuda.synchronize()`` around each). Writes ``--output`` as JSON. The bases are fitted on
random images: only speed and equality matter. ``benchmarks/gpu_check.sh`` runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from peft_residual import ResiDualConfig, embed_images, load_vision_model

from .overhead import device_name, fitted, synchronizer
from .presets import portable, recorded_command

RESIDUAL = ResiDualConfig.preset("residual")


def median_ms(function, x: torch.Tensor, repeats: int) -> float:
    sync, times = synchronizer(x.device), []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        function(x)
        sync()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from torch._dynamo.utils import counters

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local directory of a supported model")
    parser.add_argument("--image-size", type=int, default=98)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU ops; as benchmarks.overhead)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/compiled_dinov2_cuda.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, size = torch.device(args.device), args.image_size
    loaded = load_vision_model(args.model)
    models = {"bare": copy.deepcopy(loaded).to(device), "ResiDual, merged": fitted(loaded, RESIDUAL, size, device)}
    models["ResiDual, merged"].merge_adapter()
    rows = []
    with torch.no_grad():
        for name, model in models.items():
            counters.clear()
            compiled = torch.compile(lambda x, model=model: embed_images(model, x), mode=args.mode, dynamic=False)
            for batch in args.batch_sizes:
                x = torch.randn(batch, 3, size, size, device=device)
                eager = embed_images(model, x)
                for _ in range(3):  # compile, warm up, record the graph
                    difference = (compiled(x) - eager).abs().max().item()
                row = {
                    "model": name, "batch": batch, "max_abs_difference": difference,
                    "eager_ms": median_ms(lambda x, model=model: embed_images(model, x), x, args.repeats),
                    "compiled_ms": median_ms(compiled, x, args.repeats),
                    "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
                }  # fmt: skip
                rows.append(row)
                print(f"{name:>16}  batch {batch:>3}: eager {row['eager_ms']:8.3f} ms  {args.mode} "
                      f"{row['compiled_ms']:8.3f} ms  max |compiled - eager| {difference:.2e}  "
                      f"CUDA-graph skips {row['cudagraph_skips']}")  # fmt: skip
    record = {
        "command": recorded_command("benchmarks.compiled", sys.argv[1:] if argv is None else argv),
        "model": portable(args.model),
        "image_size": size,
        "mode": args.mode,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "device": device_name(device),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
