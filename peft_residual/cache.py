"""Cached-unit fast path: encode a data set once into the λ-independent parts of the ResiDual output.

The backbone is frozen and the readout reads only CLS unit contributions, so every image reduces to its PCA scores
``[sum(rank)]`` and an offset ``[dim]`` (the untransformed units and any kept remainder). Both are stored as float32:
the scores are already far smaller than the ``[units, dim]`` contributions, and float32 keeps training on the cache
equal to training end to end. An epoch on the cache costs one small matrix product per batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .decomposition import run_backbone

CACHE_DTYPE = torch.float32


@dataclass
class UnitCache:
    """``scores`` ``[n, sum(rank)]``, ``offset`` ``[n, dim]`` and ``labels`` ``[n]`` of a data set, in its order."""

    scores: torch.Tensor
    offset: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def bytes_needed(num_samples: int, num_scores: int, dim: int) -> int:
        return num_samples * ((num_scores + dim) * CACHE_DTYPE.itemsize + 8)


def available_memory_bytes() -> int:
    """Memory available to this process now, from the OS."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gather_in_order(accelerator: Accelerator, local: torch.Tensor, total: int) -> torch.Tensor:
    """Undo the ``indices[rank::world]`` sharding: gather every process's rows back into data-set order."""
    world = accelerator.num_processes
    if world == 1:
        return local
    padded = accelerator.pad_across_processes(local, dim=0)
    gathered = accelerator.gather(padded).view(world, padded.shape[0], *local.shape[1:])
    full = local.new_empty(total, *local.shape[1:])
    for rank in range(world):
        rows = len(range(rank, total, world))
        full[rank::world] = gathered[rank, :rows]
    return full


@torch.no_grad()
def encode_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    accelerator: Accelerator,
    label_column: str = "label",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    indices: Sequence[int] | None = None,
) -> UnitCache:
    """Run the backbone once over ``dataset`` (sharded across processes) and keep scores and offsets."""
    tuner = model.base_model
    adapter = tuner.active_adapters[0]
    readout = tuner.readout
    reference = next(tuner.model.parameters())
    total = len(dataset) if indices is None else len(indices)
    order = range(total) if indices is None else indices
    local = [order[i] for i in range(accelerator.process_index, total, accelerator.num_processes)]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=local, num_workers=num_workers)
    scores, offsets, labels = [], [], []
    show = progress and accelerator.is_local_main_process
    for batch in tqdm(loader, desc="Caching units", disable=not show):
        run_backbone(model, batch["pixel_values"].to(device=reference.device, dtype=reference.dtype))
        batch_scores, batch_offset = readout.scores_and_offset(adapter, tuner.trace.contributions())
        tuner.trace.clear()
        scores.append(batch_scores.to(CACHE_DTYPE))
        offsets.append(batch_offset.to(CACHE_DTYPE))
        labels.append(torch.as_tensor(batch[label_column], device=batch_scores.device))
    return UnitCache(
        _gather_in_order(accelerator, torch.cat(scores), total),
        _gather_in_order(accelerator, torch.cat(offsets), total),
        _gather_in_order(accelerator, torch.cat(labels), total),
    )
