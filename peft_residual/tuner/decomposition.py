"""Unit decomposition: the pooled (or projected) CLS output as an exact sum of per-unit direct contributions.

For a pre-LN ViT the CLS residual entering the final norm is ``r = e + sum_l (sum_h a_lh + m_l)``: the embedding, every
attention head (its slice of the output projection applied to that head's output, plus ``bias / H``, times any layer
scale) and every MLP. Freezing the final LayerNorm's per-sample statistics ``mean(r)`` and ``std(r)`` makes it linear,
followed by the projection where the model has one. The norm's (and the projection's) bias is shared ``1 / (2L + 1)``
per residual block, an attention block's share split evenly among its heads. The norm's centring can be split two
ways (:data:`LN_MEANS`), both summing exactly to the model's output:

- ``"shared"`` (the paper's code): the residual's mean is shared like the bias, so a unit with share ``s`` gets
  ``gamma * (u - s * mean(r)) / std(r) + s * beta``;
- ``"unit"``: each unit is centred on its own mean, ``gamma * (u - mean(u)) / std(r) + s * beta``.

The CLS pieces of one forward pass go into a :class:`UnitRecord` that lives only as long as that call: records sit
on a stack private to the calling thread (:func:`current_record`). The embedding's unit module opens a record when
none is waiting and the output module consumes it, so two threads, replicas sharing modules, and a forward nested
inside another each read their own pieces. The ResiDual layers capture their own pieces; :func:`recording` hooks the
modules of a bare model instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..models import Architecture, architecture_of

BASE = "__base__"
"""PEFT's name, in ``adapter_names``, for samples that get the base model's output."""

LN_MEANS = ("shared", "unit")
"""How the final norm's mean is split among the units (see the module docstring)."""


@dataclass(eq=False)
class UnitRecord:
    """The raw CLS pieces of one forward pass: the embedding, each layer's concatenated heads and each MLP output.

    The pieces keep their autograd graph: a gradient of the adapted output reaches the input and the backbone.
    """

    embedding: torch.Tensor | None = None
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer, the concatenated head outputs entering the attention output projection."""
    mlps: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer, what the attention output projection returned (before any layer scale): the heads' sum, which a
    live forward records so that the readout needs no product to get it. Stored pieces do without."""
    num_tokens: int | None = None
    """Sequence length of the embedding output, which tells the image size the model saw."""
    kept: bool = False
    """Whether the caller reads the pieces after the pass (:func:`recording`): no readout replaces the output."""
    cls_only: bool = False
    """Whether the last block runs on the CLS token alone (see :func:`last_block_at_cls`)."""
    opened_by_embedding: bool = False
    """Opened by the embedding module because no record was waiting, so the readout closes it."""
    read_out: bool = False
    """Whether the output module has read this record (it reads a pass's record once)."""
    adapter_names: tuple[str, ...] | None = None
    """Per sample, the adapter whose output it gets (:data:`BASE`: the base model's), as PEFT's ``adapter_names``."""
    stacked: tuple[str, ...] | None = None
    """Adapters whose outputs for the whole batch are returned one after another along the batch dimension (one
    backbone pass for many tasks, see ``ResiDualModel.each_adapter``)."""

    _buffer: torch.Tensor | None = field(default=None, repr=False)
    """Every piece of a live pass, ``[batch, 1 + 3 * layers, width]`` (see :meth:`capture`)."""

    def capture(self, arch: Architecture, kind: str, layer: int | None, inputs: tuple, output: torch.Tensor) -> None:
        """Store what the unit module of ``kind`` (in ``layer``) produced in one forward call.

        The pieces are copied (so that the record never holds a whole sequence alive) into one buffer allocated when
        the embedding arrives, before the first block. One small allocation per pass, rather than one per piece
        between the blocks' large activations, keeps glibc's heap from splitting the holes those activations reuse:
        with a copy per piece, some processes took ~16,000 page faults per batch-32 forward on DINOv2-S (~2 % of
        its time).
        """
        if kind == "embedding":
            width = max(arch.hidden_size, arch.num_heads * arch.head_dim)
            dtype = torch.promote_types(output.dtype, torch.float32)  # lossless for pieces of any dtype
            self._buffer = output.new_empty(len(output), 1 + 3 * arch.num_layers, width, dtype=dtype)
            self.embedding, self.num_tokens = self._piece(0, output[:, 0]), output.shape[1]
        elif kind == "heads":  # the heads enter the output projection as its input
            self.heads[layer] = self._piece(1 + 3 * layer, inputs[0][:, 0])
            self.attention[layer] = self._piece(2 + 3 * layer, output[:, 0])
        else:
            self.mlps[layer] = self._piece(3 + 3 * layer, output[:, 0])

    def reads_adapters(self) -> bool:
        """Whether the pass reads out an adapter, not only the base model's output (:data:`BASE`)."""
        names = self.stacked if self.stacked is not None else self.adapter_names
        return not self.kept and (names is None or any(name != BASE for name in names))

    def _piece(self, slot: int, piece: torch.Tensor) -> torch.Tensor:
        if self._buffer is None:  # a record opened after its pass's embedding ran: nothing to place it beside
            return piece.clone()
        stored = self._buffer[:, slot, : piece.shape[-1]]
        stored.copy_(piece)
        return stored

    def rows(self, start: int, stop: int) -> UnitRecord:
        """The pieces of samples ``start:stop``, as a record of their own."""

        def part(pieces: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {layer: piece[start:stop] for layer, piece in pieces.items()}

        return UnitRecord(
            embedding=self.embedding[start:stop], heads=part(self.heads), mlps=part(self.mlps),
            attention=part(self.attention), num_tokens=self.num_tokens,
        )  # fmt: skip

    def per_layer(self, kind: str, num_layers: int) -> torch.Tensor:
        """The pieces of ``kind`` ("heads", "attention" or "mlps") of every layer, ``[batch, layers, width]``: a
        view of a live pass's buffer, else stacked."""
        pieces = getattr(self, kind)
        if self._buffer is not None:
            slot = {"heads": 1, "attention": 2, "mlps": 3}[kind]
            return self._buffer[:, slot::3, : pieces[0].shape[-1]]
        return torch.stack([pieces[layer] for layer in range(num_layers)], 1)

    def raw_units(self, arch: Architecture, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The units as they enter the residual stream at CLS, ``[batch, units, hidden]`` (at least float32)."""
        complete = range(arch.num_layers)
        if self.embedding is None or len(self.heads) != arch.num_layers or len(self.mlps) != arch.num_layers:
            raise RuntimeError("No complete forward pass was recorded; run the model on pixel_values first.")
        dtype = torch.promote_types(dtype, self.embedding.dtype)
        units = [self.embedding.to(dtype).unsqueeze(1)]
        for layer in complete:
            units += [arch.head_contributions(layer, self.heads[layer].to(dtype)), self.mlps[layer].to(dtype)[:, None]]
        return torch.cat(units, dim=1)

    def contributions(self, arch: Architecture, ln_mean: str = "shared") -> torch.Tensor:
        """Direct contributions in output space, ``[batch, units, output_dim]`` (at least float32); they sum to the
        output."""
        return linearise(self.raw_units(arch), arch, ln_mean)


class _RecordStack(threading.local):
    def __init__(self) -> None:
        self.records: list[UnitRecord] = []
        self.handed_over: UnitRecord | None = None
        """A finished pass's record, off the stack, for a readout outside its tower (see :func:`capture`)."""


_STACK = _RecordStack()


def current_record() -> UnitRecord | None:
    """The record of the forward pass running in this thread, if one is open."""
    records = _STACK.records
    return records[-1] if records else None


def capture(arch: Architecture, kind: str, layer: int | None, inputs: tuple, output: torch.Tensor) -> None:
    """Store one unit module's piece in this thread's open record. The embedding, which runs first, opens a record
    when none is waiting (nothing open, or the open one already has its embedding: a nested forward)."""
    record = current_record()
    if kind == "embedding":
        _STACK.handed_over = None  # a new pass: a record a tower run alone handed over is stale
        if record is None or record.embedding is not None:
            record = UnitRecord(opened_by_embedding=True)
            _STACK.records.append(record)
    if record is None:
        return
    record.capture(arch, kind, layer, inputs, output)
    if (
        record.opened_by_embedding
        and kind == "mlps"
        and layer == arch.num_layers - 1
        and not _tower_holds_readout(arch)
    ):
        # the tower's last unit, its readout outside it (a two-tower model's projection): the record leaves the stack
        # now, held for that readout until the next pass starts, so that a tower run alone leaves no record open
        _STACK.handed_over = _STACK.records.pop()


def _tower_holds_readout(arch: Architecture) -> bool:
    return not arch.spec.tower or arch.readout_path.startswith(f"{arch.spec.tower}.")


def take_record() -> UnitRecord | None:
    """The record the output module reads, closed if the embedding opened it; ``None`` if that module already read
    it in this pass (BLIP's vision model calls its final norm twice). A record handed over by its tower's last unit
    (see :func:`capture`) comes first."""
    record, _STACK.handed_over = _STACK.handed_over, None
    if record is None:
        record = current_record()
        if record is not None and record.opened_by_embedding:
            _STACK.records.pop()
    if record is None or record.read_out:
        return None
    record.read_out = True
    return record


@contextmanager
def open_record(record: UnitRecord | None = None) -> Iterator[UnitRecord | None]:
    """Make ``record`` (if any) the one this thread's next forward pass fills; on exit, drop it and any record a
    forward pass inside the block opened and left open (when it raised)."""
    depth = len(_STACK.records)
    if record is not None:
        _STACK.records.append(record)
    try:
        yield record
    finally:
        del _STACK.records[depth:]


def unit_modules(arch: Architecture) -> Iterator[tuple[str, str, int | None]]:
    """``(path, kind, layer)`` of every module that produces units, in unit order."""
    yield arch.spec.embedding, "embedding", None
    for layer in range(arch.num_layers):
        yield arch.spec.attention_out.format(i=layer), "heads", layer
        yield arch.spec.mlp_out.format(i=layer), "mlps", layer


def norm_statistics(residual: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm's per-sample mean and standard deviation of the CLS residual ``[batch, hidden]``."""
    return residual.mean(dim=-1), torch.sqrt(residual.var(dim=-1, unbiased=False) + eps)


def linearise(
    raw_units: torch.Tensor,
    arch: Architecture,
    ln_mean: str = "shared",
    residual: torch.Tensor | None = None,
    shares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Push raw residual units through the final norm, frozen at each sample's statistics, and the projection;
    ``ln_mean`` says how the norm's mean is split among the units (:data:`LN_MEANS`).

    By default ``raw_units`` are all the units, which sum to the residual; give ``residual`` and the units' bias
    ``shares`` to push through only some units, or sums of units (the map is affine in them)."""
    if ln_mean not in LN_MEANS:
        raise ValueError(f"ln_mean must be one of {LN_MEANS}, got {ln_mean!r}.")
    norm, projection, dtype = arch.final_norm, arch.projection, raw_units.dtype
    residual = raw_units.sum(dim=1) if residual is None else residual
    mean, std = norm_statistics(residual, norm.eps)
    shares = (arch.bias_shares if shares is None else shares).to(raw_units)
    if ln_mean == "shared":
        centred = raw_units - shares[None, :, None] * mean[:, None, None]
    else:
        centred = raw_units - raw_units.mean(dim=-1, keepdim=True)
    out = centred / std[:, None, None]
    if norm.weight is not None:
        out = out * norm.weight.to(dtype)
    if norm.bias is not None:
        out = out + shares[:, None] * norm.bias.to(dtype)
    if projection is not None:
        out = out @ projection.weight.to(dtype).T
        if projection.bias is not None:
            out = out + shares[:, None] * projection.bias.to(dtype)
    return out


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
            for path, kind, layer in unit_modules(arch)
        ]
    if cls_only:
        handles += last_block_at_cls(arch)
    try:
        with open_record(UnitRecord(cls_only=cls_only, kept=True)) as record:
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
    either split of the norm's mean (``ln_mean``, see :data:`LN_MEANS`).

    Example:
        >>> units = decompose_units(CLIPVisionModelWithProjection(config), pixel_values)
        >>> torch.allclose(units.contributions.sum(1), model(pixel_values=pixel_values).image_embeds, atol=1e-5)
        True
    """
    arch = architecture_of(model)
    return Units(record_backbone(arch, pixel_values).contributions(arch, ln_mean), list(arch.unit_names))
