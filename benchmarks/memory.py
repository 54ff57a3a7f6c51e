"""Peak memory of fit + cache with the one-pass unit store, for growing image counts: the store spills to disk
beyond its budget, so memory stays bounded.

    python -m benchmarks.memory --images 3000 30000

A randomly initialised CLIP ViT-B/32-shaped vision model (hidden 768, 12 layers, 12 heads, projection 512) at 64 px
(5 tokens, to keep 30,000 images affordable on a CPU: the store holds 25 x 768 floats per image whatever the image
size). Each count runs in its own process. Writes benchmarks/results/memory_clip_b32_random.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from peft_residual import ResiDualConfig, encode_dataset, fit_residual_bases

from .measure import PeakRSS
from .presets import recorded_command
from .report import environment, memory_table

BUDGET = 2 * 2**30


def batches(images: int, batch_size: int = 250):
    for start in range(0, images, batch_size):
        size = min(batch_size, images - start)
        x = torch.randn(size, 3, 64, 64, generator=torch.Generator().manual_seed(start))
        yield {"pixel_values": x, "label": torch.arange(start, start + size) % 10}


def measure(images: int) -> dict:
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=64)).eval()
    peft_model = get_peft_model(model, ResiDualConfig(k=64))
    with PeakRSS() as rss:
        started = time.perf_counter()
        report = fit_residual_bases(peft_model, batches(images), progress=False, keep_units=True, max_unit_bytes=BUDGET)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        cache = encode_dataset(peft_model, report.units, progress=False)
        cache_s = time.perf_counter() - started
    record = {
        "images": images, "fit_s": fit_s, "eigen_s": report.eigen_seconds, "cache_s": cache_s,
        "store_bytes": report.units.nbytes, "spilled": report.units.spilled, "budget_bytes": BUDGET,
        "cache_bytes": cache.scores.nbytes + cache.offset.nbytes, "peak_rss_mib": rss.mib,
    }  # fmt: skip
    report.units.close()
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[3000, 30000])
    parser.add_argument("--only", type=int, help="measure one count in this process and print its JSON")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args.only)))
        return
    records = []
    for images in args.images:
        command = [sys.executable, "-m", "benchmarks.memory", "--only", str(images)]
        records.append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
        print(records[-1], flush=True)
    lines = [
        "### Peak memory of fit + cache (one pass, unit store), random CLIP ViT-B/32 shape at 64 px",
        "",
        f"Store budget {BUDGET / 2**30:.0f} GiB in memory, then a file. One process per row.",
        "",
        memory_table({"records": records}),
    ]
    payload = {"command": recorded_command("benchmarks.memory", argv or sys.argv[1:]), "records": records}
    payload["environment"] = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_clip_b32_random.json").write_text(json.dumps(payload, indent=1))
    (args.out / "memory_clip_b32_random.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
