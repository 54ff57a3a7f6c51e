"""Measurements shared by the benchmark methods: peak memory, latency, file sizes and accuracy."""

from __future__ import annotations

import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader

from peft_residual import Classifier, accuracy, embed_batches, embed_images
from peft_residual.training.scales import TILE


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 20 ms."""

    def __enter__(self) -> PeakRSS:
        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def mib(self) -> float:
        return self.peak / 2**20


@torch.no_grad()
def latency_ms(
    model: nn.Module, pixel_values: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], repeats: int = 5
) -> float:
    """Median wall time of classifying ``pixel_values``: the image-embedding forward, then the method's ``head``
    (embeddings to logits), after a warm-up. Every method is timed this way, each with its own head."""
    return 1000 * median_seconds(lambda: head(embed_images(model, pixel_values)), repeats)


def readout_products_seconds(
    components: int, dim: int, train_batches: list[int], val_batches: list[int], epochs: float, repeats: int = 5
) -> float:
    """A lower bound on any float32 training of ``components`` scales on this machine: the wall time of only the
    products that every step needs, ``(scores * λ) @ basis`` and, for the λ-gradient, ``basis @ grad`` (validation:
    the first alone), over ``epochs`` epochs of batches of these sizes. Each product is timed as one matrix product
    and as the readout's tiles of ``TILE`` samples, and the faster is taken."""
    basis = torch.randn(components, dim)
    stacked = basis.expand(math.ceil(max(train_batches + val_batches) / TILE), -1, -1)

    def forward(size: int) -> float:
        rows, tiles = torch.randn(size, components), torch.randn(math.ceil(size / TILE), TILE, components)
        return min(
            median_seconds(lambda: rows @ basis, repeats),
            median_seconds(lambda: torch.bmm(tiles, stacked[: len(tiles)]), repeats),
        )

    def backward(size: int) -> float:
        rows, tiles = torch.randn(dim, size), torch.randn(math.ceil(size / TILE), dim, TILE)
        return min(
            median_seconds(lambda: basis @ rows, repeats),
            median_seconds(lambda: torch.bmm(stacked[: len(tiles)], tiles), repeats),
        )

    step = {size: forward(size) + backward(size) for size in set(train_batches)}
    evaluation = {size: forward(size) for size in set(val_batches)}
    return epochs * (sum(step[size] for size in train_batches) + sum(evaluation[size] for size in val_batches))


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``call`` over ``repeats`` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def saved_bytes(save: Callable[[Path], object]) -> int:
    """Bytes of the safetensors and JSON files that ``save(directory)`` writes into a temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        save(Path(directory))
        return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.suffix in (".safetensors", ".json"))


def test_accuracy(model: nn.Module, classifier: Classifier, dataset, batch_size: int, workers: int = 0) -> float:
    features, labels = embed_batches(model, DataLoader(dataset, batch_size=batch_size, num_workers=workers))
    with torch.no_grad():
        return accuracy(classifier(features), labels)
