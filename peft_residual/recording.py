"""Recording unit pieces from images: one backbone pass per batch, without any ResiDual readout.

The intake of the PCA fit (:func:`~.tuner.pca.get_residual_bases`), of the unit stores and caches, and of the
analyses: the ``pixel_values`` (and labels) of a batch, a :class:`RecordedBatch` per batch, and
:func:`decompose_units`, the model's output as its units' direct contributions. A bare supported model is recorded
through hooks on its unit modules; a ResiDual model's layers capture their own pieces
(:mod:`peft_residual.records`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .errors import ResiDualInputError
from .models import Architecture, architecture_of
from .records import UnitRecord, capture, current_record, open_record
from .tuner.decomposition import contributions


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


def _capture_hook(arch: Architecture, kind: str, layer: int | None):
    def hook(module: nn.Module, inputs: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if kind == "heads":
            heads, projected = arch.attention_pieces(module, inputs, kwargs, output)
            capture(arch, kind, layer, (heads,), projected)
        else:
            capture(arch, kind, layer, inputs, output)

    return hook


def _first_token_only(module: nn.Module, args: tuple) -> tuple | None:
    record = current_record()
    if record is None or not record.cls_only:
        return None  # another thread's forward, or an adapted one: the whole sequence
    return (args[0][:, :1], *args[1:])


@contextmanager
def recording(arch: Architecture, cls_only: bool = False) -> Iterator[UnitRecord]:
    """Record the unit pieces of the next forward pass in the block, without any ResiDual readout.

    Works on a bare supported model (hooks on the unit modules for the block's duration, which store into this
    thread's record only) and on one wrapped by PEFT (its layers capture their own pieces). With ``cls_only`` the
    last block runs on the CLS token alone (see :func:`last_block_at_cls`).
    """
    wrapped = getattr(arch.model.get_submodule(arch.spec.embedding), "captures_units", False)
    handles = []
    if not wrapped:
        handles = [
            arch.module(path).register_forward_hook(_capture_hook(arch, kind, layer), with_kwargs=True)
            for path, kind, layer in arch.unit_modules()
        ]
    if cls_only:
        handles += last_block_at_cls(arch)
    try:
        with open_record(cls_only=cls_only, kept=True) as record:
            yield record
    finally:
        for handle in handles:
            handle.remove()


def last_block_at_cls(arch: Architecture) -> list:
    """Hooks that run the last block's attention output projection and MLP on the CLS token alone, in passes whose
    record asks for it; returns their handles.

    Only CLS leaves the last block toward the pooled output, so the other tokens' projections and MLPs there are
    wasted work in a pass that only records units. The block's residual adds then broadcast CLS over the sequence:
    every token but CLS of its output is wrong, so the model's outputs must not be used in such a pass.
    """
    last = arch.num_layers - 1
    paths = (arch.spec.attention_out, arch.spec.mlp or arch.spec.mlp_out)
    # on the outermost module at each path: a ResiDual layer around nn.MultiheadAttention never calls the module
    modules = [arch.model.get_submodule(path.format(i=last)) for path in paths]
    return [module.register_forward_pre_hook(_first_token_only) for module in modules]


@torch.no_grad()
def record_backbone(arch: Architecture, pixel_values: torch.Tensor) -> UnitRecord:
    """Run only the vision backbone (no ResiDual readout) and return what its unit modules produced."""
    with recording(arch, cls_only=True) as record:
        arch.run_tower(pixel_values)
    return record


class Units(NamedTuple):
    """Direct contributions ``[batch, units, output_dim]`` and the unit names along dimension 1."""

    contributions: torch.Tensor
    names: list[str]


@torch.no_grad()
def decompose_units(model: nn.Module, pixel_values: torch.Tensor, ln_mean: str = "shared") -> Units:
    """Decompose the model's pooled (or projected) CLS output into per-unit direct contributions.

    ``contributions.sum(1)`` equals the base model's ``pooler_output`` (``image_embeds`` with a projection) for
    either split of the norm's mean (``ln_mean``, see ``peft_residual.tuner.decomposition.LN_MEANS``).

    Example:
        >>> units = decompose_units(CLIPVisionModelWithProjection(config), pixel_values)
        >>> torch.allclose(units.contributions.sum(1), model(pixel_values=pixel_values).image_embeds, atol=1e-5)
        True
    """
    arch = architecture_of(model)
    return Units(contributions(record_backbone(arch, pixel_values), arch, ln_mean), list(arch.unit_names))
