"""LR range test for the ResiDual scales."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from schedulefree import AdamWScheduleFree

from ..classifiers import Classifier
from .scales import ScaleSet
from .steps import Features, global_batches, train_step


def find_learning_rate(
    scales: ScaleSet,
    classifier: Classifier,
    features: Features,
    *,
    seed: int = 0,
    batch_size: int = 64,
    accelerator: Accelerator | None = None,
    start: float = 1e-3,
    end: float = 10.0,
    steps: int = 40,
) -> float:
    """Raise the rate exponentially over ``steps`` steps and return the rate where the smoothed loss falls
    fastest. The scales are restored afterwards.

    Example:
        >>> lr = find_learning_rate(ScaleSet(peft_model), classifier, encode_dataset(peft_model, train))
    """
    saved = scales.snapshot()
    rates = torch.logspace(math.log10(start), math.log10(end), steps).tolist()
    generator = torch.Generator().manual_seed(seed)
    repeats = math.ceil(steps * batch_size / len(features))
    order = torch.cat([torch.randperm(len(features), generator=generator) for _ in range(repeats)])
    optimizer = AdamWScheduleFree(scales.params, lr=rates[0])
    optimizer.train()
    losses = []
    try:
        for rate, batch in zip(rates, global_batches(features, order, batch_size, accelerator), strict=False):
            for group in optimizer.param_groups:
                group["lr"] = rate
            loss = train_step(scales, classifier, optimizer, batch, accelerator, check_finite=False)
            losses.append(loss)
            if not math.isfinite(loss) or loss > 4 * min(losses):
                break
    finally:
        scales.load(saved)
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses if math.isfinite(losses[-1]) else losses[:-1]):
        average = 0.8 * average + 0.2 * loss
        smoothed.append(average / (1 - 0.8 ** (i + 1)))
    if len(smoothed) < 3:
        return rates[0]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) for i in range(1, len(smoothed) - 1)]
    return rates[1 + min(range(len(slopes)), key=slopes.__getitem__)]
