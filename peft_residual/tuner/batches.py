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
    """The ``pixel_values`` of a batch: a dict holding them, a tensor, or an ``(images, labels)`` pair (or a
    one-tensor list) as ``TensorDataset`` and torchvision's data sets give them."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ResiDualInputError(f"Each batch must hold 'pixel_values'; this one has keys {sorted(batch)}.")
        return batch["pixel_values"]
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ResiDualInputError(
        f"Batches must be dicts with 'pixel_values', tensors or (images, labels) pairs, got {type(batch).__name__}."
    )


def labels_of(batch: object, label_column: str = "label") -> torch.Tensor | None:
    """The labels of a batch, if it has any: a dict's ``label_column`` (for the default ``"label"``, also
    ``"labels"``, the key of transformers' ``Trainer`` and image-classification collators), or the second tensor of
    an ``(images, labels)`` pair."""
    if isinstance(batch, Mapping):
        keys = (label_column, "labels") if label_column == "label" else (label_column,)
        found = next((key for key in keys if key in batch), None)
        return torch.as_tensor(batch[found]) if found is not None else None
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        return torch.as_tensor(batch[1])
    return None


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
        labels = labels_of(batch, label_column)
        yield RecordedBatch(
            record_backbone(arch, pixel_values.to(reference.device, reference.dtype)), labels, image_size
        )
