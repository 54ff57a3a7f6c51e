"""How fast one thread streams the readout's maps from memory, by layout (issue 28): the reason for ``fold.py``'s
layout. Each product is timed right after a flush of the caches (an 88 MB write, DINOv2-S's weights' size), as in
a batch-1 forward, where the model's weights evict the maps between two calls; the median of ``--repeats``.

    python -m benchmarks.map_layout

Merged ResiDual on DINOv2-S reads 24 maps of ``384 x 384`` (one per layer's heads and per MLP): as one product per
piece, or as one product of the pieces side by side with one ``[output_dim, 24 * 384]`` map. Live, it reads its
9,360 components once per sample in a one-row product: stored ``[components, output_dim]`` or ``[output_dim,
components]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def flushed_ms(product: Callable[[], torch.Tensor], flush: torch.Tensor, repeats: int) -> float:
    """Median ms of ``product()``, each call after ``flush`` was rewritten."""
    times = []
    for _ in range(repeats):
        flush.mul_(1.0)
        started = time.perf_counter()
        product()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=384, help="output and piece width (DINOv2-S: 384)")
    parser.add_argument("--pieces", type=int, default=24, help="maps merged (ResiDual on 12 layers: 24)")
    parser.add_argument("--components", type=int, default=9360, help="components read out live")
    parser.add_argument("--repeats", type=int, default=61)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    flush = randn(22_000_000)
    dim, pieces, bias = args.dim, args.pieces, randn(args.dim)
    inputs, maps = [randn(1, dim) for _ in range(pieces)], [randn(dim, dim) for _ in range(pieces)]
    staged, stacked = randn(1, pieces * dim), randn(dim, pieces * dim)

    def per_piece() -> torch.Tensor:
        out = bias
        for piece, piece_map in zip(inputs, maps, strict=True):
            out = torch.addmm(out, piece, piece_map)
        return out

    scores = randn(1, args.components)
    by_component, by_output = randn(args.components, dim), randn(dim, args.components)
    timed = {
        f"merged: {pieces} products, [{dim}, {dim}] maps": per_piece,
        f"merged: one product, [{dim}, {pieces * dim}] map (fold.py)": lambda: torch.addmm(bias, staged, stacked.T),
        f"live: components [{args.components}, {dim}]": lambda: torch.addmm(bias, scores, by_component),
        f"live: components [{dim}, {args.components}] (fold.py)": lambda: torch.addmm(bias, scores, by_output.T),
    }
    for name, product in timed.items():
        print(f"{name:>48}: {flushed_ms(product, flush, args.repeats):6.3f} ms")


if __name__ == "__main__":
    main()
