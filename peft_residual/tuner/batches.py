"""Batches into unit pieces: the ``pixel_values`` of a batch, and one backbone pass per batch of images into a
:class:`RecordedBatch`. The intake of the fit (:func:`~.pca.get_residual_bases`), which the unit stores of
:mod:`peft_residual.data` share: it lives in the tuner so that the tuner imports nothing of the data package."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import torch

from ..errors import ResiDualInputError
from ..models import Architecture
from .decomposition import UnitRecord, record_backbone


def pixel_values_of(batch: object) -> torch.Tensor:
    """The ``pixel_values`` of a batch that is a dict holding them, or a tensor."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ResiDualInputError(f"Each batch must hold 'pixel_values'; this one has keys {sorted(batch)}.")
        return batch["pixel_values"]
    if isinstance(batch, torch.Tensor):
        return batch
    raise ResiDualInputError(f"Batches must be dicts with 'pixel_values' or tensors, got {type(batch).__name__}.")


class RecordedBatch(NamedTuple):
    """The unit pieces of one batch of images, with its labels (if any) and the images' size."""

    record: UnitRecord
    labels: torch.Tensor | None
    image_size: tuple[int, int]


def recorded_batches(
    arch: Architecture, data: Iterable, where: str, label_column: str = "label"
) -> Iterator[RecordedBatch]:
    """A :class:`RecordedBatch` per batch of ``data``: images through the backbone once each, or batches that were
    recorded already passed on as they are. All images must have one size."""
    reference = next(arch.model.parameters())
    image_size = None
    for step, batch in enumerate(data):
        if isinstance(batch, RecordedBatch):
            yield batch
            continue
        pixel_values = arch.check_pixel_values(pixel_values_of(batch), f"{where} batch {step}")
        if image_size not in (None, tuple(pixel_values.shape[-2:])):
            raise ResiDualInputError(
                f"{where} batch {step} has images of {tuple(pixel_values.shape[-2:])} px after {image_size}; use "
                "images of one size (the size the adapter will see)."
            )
        image_size = tuple(pixel_values.shape[-2:])
        labels = torch.as_tensor(batch[label_column]) if isinstance(batch, Mapping) and label_column in batch else None
        yield RecordedBatch(
            record_backbone(arch, pixel_values.to(reference.device, reference.dtype)), labels, image_size
        )
