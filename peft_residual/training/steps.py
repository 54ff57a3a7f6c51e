"""One training step and one evaluation pass on the scales, shared by training and the LR range test.

Every process walks the same global batches and takes its share of each: on the unit cache, whole tiles (tiles
``rank, rank + world, ...`` of :data:`~.scales.TILE` samples), so that every sample's arithmetic is the same for any
number of processes; streamed through the backbone, samples ``rank, rank + world, ...``, so that every process gets
backbone work (the backbone's own float32 products depend on the batch anyway). Gradients and counts are summed
across processes, and the loss is normalised by the global batch, so any number of processes computes the same
update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from schedulefree import AdamWScheduleFree

from ..classifiers import Classifier
from ..errors import ResiDualInputError
from .cache import StreamedUnits, UnitCache
from .disk_cache import DiskUnitCache
from .scales import ScaleSet

Features = UnitCache | DiskUnitCache | StreamedUnits
"""What training reads: the unit cache in memory or on disk, or batches streamed through the backbone."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shuffle, for every method trained on the same images."""
    return seed * 100_003 + epoch


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def global_batches(
    features: Features, order: torch.Tensor, batch_size: int, accelerator: Accelerator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """``(scores, offset, labels, global batch size)`` of this process's share of each batch of ``order``."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    granule = features.granule
    batches = list(order.split(batch_size))
    local = [_share(batch.split(granule), rank, world) for batch in batches]
    for (scores, offset, labels), batch in zip(features.batches(local), batches, strict=True):
        yield scores, offset, labels, len(batch)


def _share(granules: tuple[torch.Tensor, ...], rank: int, world: int) -> torch.Tensor:
    mine = granules[rank::world]
    return torch.cat(mine) if mine else granules[0][:0]


def _sum(accelerator: Accelerator | None, value: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(value, "sum") if accelerator is not None and accelerator.num_processes > 1 else value


def train_step(
    scales: ScaleSet,
    classifier: Classifier,
    optimizer: AdamWScheduleFree,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
    accelerator: Accelerator | None,
    check_finite: bool = True,
) -> float:
    """One optimiser step on a global batch; returns its mean loss over all processes. A classifier with trainable
    parameters (a :class:`~peft_residual.classifiers.LinearClassifier`) gets their gradients too; they are cleared
    after the step, so an optimiser that holds only the scales (the LR range test) never sees them."""
    scores, offset, labels, size = batch
    logits = classifier(scales.output(scores, offset))
    loss = F.cross_entropy(logits, labels.to(logits.device), reduction="sum") / size
    loss.backward()
    params = [*scales.params, *(p for p in classifier.parameters() if p.requires_grad)]
    for param in params:
        param.grad = _sum(accelerator, param.grad)
    optimizer.step()
    for param in params:
        param.grad = None
    value = float(_sum(accelerator, loss.detach()))
    if check_finite and not (math.isfinite(value) and bool(torch.isfinite(scales.values).all())):
        raise ResiDualInputError(
            f"The training loss became {value} (scales non-finite); lower the learning rate "
            f"(now {optimizer.param_groups[0]['lr']}) or check the classifier."
        )
    return value


@torch.no_grad()
def evaluate(
    scales: ScaleSet,
    classifier: Classifier,
    features: Features,
    batch_size: int,
    accelerator: Accelerator | None,
) -> float:
    """Top-1 accuracy of the adapted embeddings of ``features`` under ``classifier``."""
    correct = torch.zeros((), dtype=torch.float64, device=scales.basis.device)
    for scores, offset, labels, _ in global_batches(features, torch.arange(len(features)), batch_size, accelerator):
        logits = classifier(scales.output(scores, offset))
        correct += (logits.argmax(-1) == labels.to(logits.device)).sum()
    return float(_sum(accelerator, correct)) / len(features)
