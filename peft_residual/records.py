"""The record of one forward pass's unit pieces: the CLS piece of every module that produces units (the embedding,
each layer's heads entering the attention output projection, each MLP's output), filled as the pass runs.

A record lives only as long as its call, on a stack private to the calling thread (:func:`current_record`): the
embedding's module opens one when none is waiting and the output module consumes it, so threads, replicas sharing
modules and nested forwards each read their own pieces. A ResiDual model's unit layers fill it and its readout reads
it (:mod:`peft_residual.tuner.layer`); a bare model's are filled by hooks (:mod:`peft_residual.recording`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .models import Architecture

BASE = "__base__"
"""PEFT's name, in ``adapter_names``, for samples that get the base model's output."""


class PieceFolder(Protocol):
    """What a pass folds its pieces into as they arrive (one adapter's :class:`~.tuner.fold.Fold`)."""

    def add(self, key: tuple[str, int | None], piece: torch.Tensor, output: torch.Tensor, folded: object) -> object:
        """``folded`` after the piece ``key`` (``(kind, layer)``) ``[batch, in]``, whose module's ``output``
        ``[batch, tokens, hidden]`` adds to the residual stream (before any layer scale)."""


@dataclass(eq=False)
class UnitRecord:
    """The raw CLS pieces of one forward pass: the embedding, each layer's concatenated heads and each MLP output,
    with their autograd graph (a gradient of the adapted output reaches the input and the backbone)."""

    embedding: torch.Tensor | None = None
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer, the concatenated head outputs entering the attention output projection."""
    mlps: dict[int, torch.Tensor] = field(default_factory=dict)
    num_tokens: int | None = None
    """Sequence length of the embedding output, which tells the image size the model saw."""
    kept: bool = False
    """Whether the caller reads the pieces after the pass (``peft_residual.recording``): no readout replaces the
    output."""
    cls_only: bool = False
    """Whether the last block runs on the CLS token alone (``peft_residual.recording.last_block_at_cls``)."""
    opened_by_embedding: bool = False
    """Opened by the embedding module because no record was waiting, so the readout closes it."""
    read_out: bool = False
    """Whether the output module has read this record (it reads a pass's record once)."""
    adapter_names: tuple[str, ...] | None = None
    """Per sample, the adapter whose output it gets (:data:`BASE`: the base model's), as PEFT's ``adapter_names``."""
    stacked: tuple[str, ...] | None = None
    """Adapters whose outputs for the whole batch are returned one after another along the batch dimension (one
    backbone pass for many tasks, see ``ResiDualModel.each_adapter``)."""
    folds: dict[str, PieceFolder] | None = None
    """Per adapter read out, its :class:`~.tuner.fold.Fold`, which takes each piece as it arrives; ``None``: the pieces
    are kept (see ``ResiDualReadoutLayer.folds_for``). Set when the embedding arrives."""
    folded: dict[str, object] = field(default_factory=dict)
    """Per adapter of :attr:`folds`, what the pieces so far folded into."""
    residual: torch.Tensor | None = None
    """The CLS residual entering the final norm, in a pass that folds (see :func:`note_residual`)."""

    _buffer: torch.Tensor | None = field(default=None, repr=False)
    """Every kept piece of a pass, ``[batch, 1 + 2 * layers, width]`` (see :meth:`capture`)."""

    @classmethod
    def from_pieces(cls, pieces: torch.Tensor) -> UnitRecord:
        """Stored pieces ``[batch, 1 + 2 * layers, width]`` (the embedding, then each layer's concatenated heads and
        MLP output, as ``UnitStore`` stacks them) as the record of a pass that kept them."""
        record = cls(embedding=pieces[:, 0], kept=True)
        for layer in range((pieces.shape[1] - 1) // 2):
            record.heads[layer], record.mlps[layer] = pieces[:, 1 + 2 * layer], pieces[:, 2 + 2 * layer]
        return record

    def capture(self, arch: Architecture, kind: str, layer: int | None, inputs: tuple, output: torch.Tensor) -> None:
        """Fold or keep what the unit module of ``kind`` (in ``layer``) produced in one forward call.

        Kept pieces are copied (never holding a sequence alive) into one buffer allocated with the embedding: one
        small allocation per pass, not one per piece between the blocks' large activations, keeps glibc's heap from
        splitting the holes they reuse (a copy per piece cost ~16,000 page faults per batch-32 DINOv2-S forward).
        """
        if kind == "embedding":
            self.num_tokens = output.shape[1]
        piece = inputs[0][:, 0] if kind == "heads" else output[:, 0]  # the heads enter the projection as its input
        if self.folds is not None:
            for name, fold in self.folds.items():
                self.folded[name] = fold.add((kind, layer), piece, output, self.folded.get(name))
            return
        if kind == "embedding":
            width = max(arch.hidden_size, arch.num_heads * arch.head_dim)
            dtype = torch.promote_types(output.dtype, torch.float32)  # lossless for pieces of any dtype
            self._buffer = output.new_empty(len(output), 1 + 2 * arch.num_layers, width, dtype=dtype)
            self.embedding = self._piece(0, piece)
        else:
            getattr(self, kind)[layer] = self._piece((kind == "mlps") + 1 + 2 * layer, piece)

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
            num_tokens=self.num_tokens, kept=True,
        )  # fmt: skip

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


def capture(
    arch: Architecture,
    kind: str,
    layer: int | None,
    inputs: tuple,
    output: torch.Tensor,
    folds_for: Callable[[UnitRecord], dict[str, PieceFolder] | None] | None = None,
) -> None:
    """Fold or keep one unit module's piece in this thread's open record. The embedding, which runs first, opens a
    record when none is waiting (nothing open, or the open one already has its embedding or folds: a nested
    forward), and decides with ``folds_for`` (a ResiDual model's; none: keep) what the pass folds."""
    record = current_record()
    if kind == "embedding":
        _STACK.handed_over = None  # a new pass: a record a tower run alone handed over is stale
        if record is None or record.embedding is not None or record.folds is not None:
            record = UnitRecord(opened_by_embedding=True)
            _STACK.records.append(record)
        if folds_for is not None and not record.kept:
            record.folds = folds_for(record)
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


def note_residual(norm: nn.Module, args: tuple) -> None:
    """A forward pre-hook on the final norm (of a ResiDual model): a pass that folds its pieces notes the CLS
    residual entering the norm, whose statistics scale every unit (the first call only: BLIP's vision model calls
    its final norm again on the normed CLS)."""
    record = _STACK.handed_over or current_record()
    if record is not None and record.folds is not None and record.residual is None:
        residual = args[0]
        record.residual = residual[:, 0] if residual.dim() == 3 else residual


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
def open_record(**fields: Any) -> Iterator[UnitRecord | None]:
    """Open a record with ``fields`` (none given: open none) for this thread's next forward pass to fill; on exit,
    drop it and any record a forward pass inside the block opened and left open (when it raised).

    Example:
        >>> with open_record(kept=True) as record:
        ...     peft_model(pixel_values=x)  # its ResiDual layers fill the record; kept: no readout replaces the output
    """
    depth = len(_STACK.records)
    record = UnitRecord(**fields) if fields else None
    if record is not None:
        _STACK.records.append(record)
    try:
        yield record
    finally:
        del _STACK.records[depth:]
