"""Inference overhead of the ResiDual readout against the base forward, in one process, interleaved.

    python -m benchmarks.overhead --model ~/.cache/residual-assets/models/dinov2-small-imgfocus --image-size 98

Prints, per batch size and configuration, the median wall time of the base model and of the adapted model
(alternating calls, after a warm-up) and their ratio. The bases are fitted on random images: only speed matters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model

from peft_residual import ResiDualConfig, embed_images, fit_residual_bases, load_vision_model


def interleaved_ms(adapted, pixel_values: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms of the base forward (adapter bypassed) and of the adapted forward, alternating."""
    base, ours = [], []
    with torch.no_grad():
        for _ in range(3):
            embed_images(adapted, pixel_values)
        for _ in range(repeats):
            started = time.perf_counter()
            with adapted.disable_adapter():
                embed_images(adapted, pixel_values)
            base.append(time.perf_counter() - started)
            started = time.perf_counter()
            embed_images(adapted, pixel_values)
            ours.append(time.perf_counter() - started)
    return 1000 * statistics.median(base), 1000 * statistics.median(ours)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image-size", type=int, default=98)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    size = args.image_size
    for name, config in (("k=64 heads", ResiDualConfig(k=64)), ("ResiDual", ResiDualConfig.preset("residual"))):
        model = get_peft_model(load_vision_model(args.model), config)
        fit_residual_bases(model, [{"pixel_values": torch.randn(64, 3, size, size)} for _ in range(8)], progress=False)
        for batch in args.batch_sizes:
            base, ours = interleaved_ms(model, torch.randn(batch, 3, size, size), args.repeats)
            print(
                f"{name:>10}  batch {batch:>3}: base {base:8.2f} ms  ResiDual {ours:8.2f} ms  ratio {ours / base:.3f}"
            )


if __name__ == "__main__":
    main()
