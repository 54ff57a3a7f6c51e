"""The λ-independent parts of the ResiDual output, per image: computed once and cached, or streamed.

The backbone is frozen and the readout reads only CLS unit contributions, so every image reduces to its PCA scores
``[sum(rank)]`` and an offset ``[dim]`` (the untransformed units and any kept remainder). Both are stored as float32:
the scores are already far smaller than the ``[units, dim]`` contributions. An epoch on the cache costs one small
matrix product per batch; :class:`StreamedUnits` computes the same tensors through the backbone at every step, for
data sets too large to cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.units import UnitStore
from ..errors import ResiDualInputError
from ..inference import check_labels
from ..recording import record_backbone
from ..records import UnitRecord
from ..tuner import active_adapter, residual_tuner
from ..tuner.plan import readout
from .scales import TILE

CACHE_DTYPE = torch.float32

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(scores, offset, labels)`` of some images."""


@dataclass(frozen=True)
class EncodeOptions:
    """How an encoding reads a data set (the keyword arguments of :func:`encode_dataset`)."""

    label_column: str = "label"
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True
    num_classes: int | None = None
    desc: str = "Caching units"


def encode_batch(
    model: nn.Module, pixel_values: torch.Tensor | None, where: str, record: UnitRecord | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA scores and offset of one batch of images (or of its recorded unit pieces) for the active adapter."""
    tuner = residual_tuner(model)
    if record is None:
        pixel_values = tuner.arch.check_pixel_values(pixel_values, where)
        reference = next(tuner.model.parameters())
        record = record_backbone(tuner.arch, pixel_values.to(reference.device, reference.dtype))
    scores, offset = tuner.readout.scores_and_offset(active_adapter(tuner), record)
    if not (torch.isfinite(scores).all() and torch.isfinite(offset).all()):
        raise ResiDualInputError(f"{where}: the unit scores are not finite; check the images and the model's dtype.")
    return scores.to(CACHE_DTYPE), offset.to(CACHE_DTYPE)


def encode_recorded(model: nn.Module, record: UnitRecord, where: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_batch` of one stored batch, ``chunk`` images at a time: a stored batch can be large, and the
    encoding's transient contributions (``[images, units, dim]``, several at once) beyond glibc's 32 MB mmap
    threshold are fresh pages on every batch. The chunks split each stored batch the same way on any number of
    processes."""
    size = len(record.embedding)
    parts = [encode_batch(model, None, where, record.rows(start, start + chunk)) for start in range(0, size, chunk)]
    return torch.cat([scores for scores, _ in parts]), torch.cat([offset for _, offset in parts])


@dataclass
class UnitCache:
    """``scores`` ``[n, sum(rank)]``, ``offset`` ``[n, dim]`` and ``labels`` ``[n]`` of a data set, in its order."""

    scores: torch.Tensor
    offset: torch.Tensor
    labels: torch.Tensor
    granule: ClassVar[int] = TILE
    """Training shares each batch among processes by whole tiles (see :mod:`.steps`)."""

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
        for indices in index_batches:
            yield self.scores[indices], self.offset[indices], self.labels[indices]

    @staticmethod
    def bytes_needed(num_samples: int, num_scores: int, dim: int) -> int:
        return num_samples * ((num_scores + dim) * CACHE_DTYPE.itemsize + 8)


@dataclass
class StreamedUnits:
    """The same batches as a :class:`UnitCache`, computed through the backbone on demand."""

    model: nn.Module
    dataset: Dataset
    label_column: str = "label"
    num_workers: int = 0
    num_classes: int | None = None
    granule: ClassVar[int] = 1

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
        samplers = [indices.tolist() for indices in index_batches if len(indices)]
        loader = iter(DataLoader(self.dataset, batch_sampler=samplers, num_workers=self.num_workers))
        for step, indices in enumerate(index_batches):
            if not len(indices):  # a batch with fewer samples than there are processes left this one none
                yield empty_batch(self.model)
                continue
            batch = next(loader)
            where = f"training batch {step}"
            scores, offset = encode_batch(self.model, batch["pixel_values"], where)
            labels = check_labels(torch.as_tensor(batch[self.label_column]), self.num_classes, where)
            yield scores, offset, labels.to(scores.device)


def empty_batch(model: nn.Module) -> Batch:
    """The scores, offset and labels of no images, for a process with no share of some work."""
    tuner = residual_tuner(model)
    device = next(tuner.model.parameters()).device
    return (
        torch.empty(0, len(tuner.readout.components(active_adapter(tuner)).basis), dtype=CACHE_DTYPE, device=device),
        torch.empty(0, tuner.arch.output_dim, dtype=CACHE_DTYPE, device=device),
        torch.empty(0, dtype=torch.long, device=device),
    )


def available_memory_bytes() -> int:
    """Memory available to this process now, from the OS."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gather_batches(accelerator: Accelerator, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Undo sharding by whole batches (process ``r`` holds batches ``r, r + world, ...`` of ``sizes``)."""
    world = accelerator.num_processes
    if world == 1:
        return local
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0))
    gathered = gathered.view(world, -1, *local.shape[1:])
    starts = [0] * world
    pieces = []
    for index, size in enumerate(sizes):
        rank = index % world
        pieces.append(gathered[rank, starts[rank] : starts[rank] + size])
        starts[rank] += size
    return torch.cat(pieces)


@torch.no_grad()
def encode_dataset(
    model: nn.Module,
    dataset: Dataset,
    accelerator: Accelerator | None = None,
    label_column: str = "label",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    num_classes: int | None = None,
    desc: str = "Caching units",
) -> UnitCache:
    """Run the backbone once over ``dataset`` and keep every image's scores, offset and label.

    ``dataset`` may be a :class:`UnitStore` (e.g. ``FitReport.units``): then no backbone runs at all. Under
    Accelerate the work is split by whole batches, so every image is encoded in exactly the batch it would be in on
    one process: the cache does not depend on the number of processes.

    Example:
        >>> cache = encode_dataset(peft_model, train_dataset)
        >>> cache.scores.shape  # [images, scales]
    """
    if len(dataset) == 0:
        raise ResiDualInputError(f"{desc}: the data set is empty.")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if isinstance(dataset, UnitStore):
        return _encode_store(model, dataset, accelerator, batch_size, num_classes, progress, desc)
    index_batches = list(torch.arange(len(dataset)).split(batch_size))
    mine = [indices.tolist() for indices in index_batches[rank::world]]
    loader = DataLoader(dataset, batch_sampler=mine, num_workers=num_workers)
    scores, offsets, labels = [], [], []
    for step, batch in enumerate(tqdm(loader, desc=desc, disable=not progress or rank != 0)):
        where = f"{desc} batch {rank + step * world}"
        batch_scores, batch_offset = encode_batch(model, batch["pixel_values"], where)
        scores.append(batch_scores)
        offsets.append(batch_offset)
        batch_labels = check_labels(torch.as_tensor(batch[label_column]), num_classes, where)
        labels.append(batch_labels.to(batch_scores.device))
    if not mine:  # more processes than batches: this one encoded nothing but still takes part in the gather
        scores, offsets, labels = ([part] for part in empty_batch(model))
    sizes = [len(indices) for indices in index_batches]
    gather = (lambda t: _gather_batches(accelerator, t, sizes)) if accelerator else (lambda t: t)
    return UnitCache(gather(torch.cat(scores)), gather(torch.cat(offsets)), gather(torch.cat(labels)))


def _encode_store(
    model: nn.Module,
    store: UnitStore,
    accelerator: Accelerator | None,
    chunk: int,
    num_classes: int | None,
    progress: bool,
    desc: str,
) -> UnitCache:
    """Encode stored units batch by batch as they were recorded (this process's share of those batches), and
    gather the shares."""
    if store.labels is None:
        raise ResiDualInputError(f"{desc}: the stored units have no labels; collect them from batches with labels.")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    layout, mine = store.shard_of(world, rank)
    parts = []
    batches = tqdm(store.recorded_batches(mine), desc=desc, total=len(mine), disable=not progress or rank != 0)
    for step, (record, labels, _) in zip(mine, batches, strict=True):
        where = f"{desc} batch {step}"
        parts.append((*encode_recorded(model, record, where, chunk), check_labels(labels, num_classes, where)))
    scores, offsets, labels = (torch.cat(part) for part in zip(*parts, strict=True)) if parts else empty_batch(model)
    gather = (lambda t: _gather_batches(accelerator, t, list(layout.batch_sizes))) if world > 1 else (lambda t: t)
    return UnitCache(gather(scores), gather(offsets), gather(labels.to(scores.device)))


def adapted_embeddings(model: nn.Module, cache: UnitCache) -> torch.Tensor:
    """The adapter's output for every image of ``cache``: what the model would return, without the backbone."""
    tuner = residual_tuner(model)
    adapter = active_adapter(tuner)
    with torch.no_grad():
        basis = tuner.readout.components(adapter).basis
        return readout(cache.scores.to(basis), tuner.readout.lambdas(adapter).to(basis), basis, cache.offset.to(basis))
