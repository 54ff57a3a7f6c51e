"""Raw CLS pieces of many images, kept once so that fitting, caching and scoring need one backbone pass.

Per image the pieces are ``(2L + 1) x hidden`` floats (the embedding, each layer's concatenated head outputs and MLP
output at CLS); every unit contribution, the final norm's statistics included, follows from them exactly (see
:class:`~.decomposition.UnitRecord`). The store keeps them in memory up to a byte budget and spills everything to a
file in a temporary directory beyond it; the file goes when the store is closed or collected.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..tuner import pca
from ..tuner.architectures import Architecture, architecture_of
from ..tuner.decomposition import UnitRecord
from ..tuner.errors import ResiDualInputError
from ..tuner.model import residual_tuner

DEFAULT_MAX_BYTES = 2 * 2**30
RECORD_BATCH = 256
"""Images per batch when stored units are read back."""


def content_hash(*tensors: torch.Tensor) -> str:
    """A short hash of the tensors' shapes, dtypes and bytes."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class UnitStore:
    """The pieces ``[n, 2L + 1, hidden]`` (float32) and labels ``[n]`` of a data set, in its order.

    Example:
        >>> report = fit_residual_bases(peft_model, loader, keep_units=True)
        >>> cache = encode_dataset(peft_model, report.units)  # no second backbone pass
    """

    def __init__(self, arch: Architecture, max_bytes: int | None = None) -> None:
        self.arch = arch
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.piece_shape = (2 * arch.num_layers + 1, arch.hidden_size)
        self._chunks: list[torch.Tensor] = []
        # labels as Python ints, not one small tensor per batch: a small allocation kept after each large transient
        # one pins glibc's heap, which then grows by a batch of pieces per batch (seen at 20,000 images: +1.5 GB)
        self._labels: list[int] = []
        self._labelled_batches = 0
        self._sizes: list[int] = []
        self._count = 0
        self._directory: Path | None = None
        self._cleanup: weakref.finalize | None = None
        self.image_size: tuple[int, int] | None = None
        """The images' height and width."""

    def __len__(self) -> int:
        return self._count

    @property
    def spilled(self) -> bool:
        """Whether the pieces live in a file rather than in memory."""
        return self._directory is not None

    @property
    def spill_directory(self) -> Path | None:
        """The temporary directory of the spill file, if any."""
        return self._directory

    @property
    def nbytes(self) -> int:
        return self._count * int(np.prod(self.piece_shape)) * 4

    @property
    def labels(self) -> torch.Tensor | None:
        """Labels of every image, or None if the batches had none."""
        complete = self._sizes and self._labelled_batches == len(self._sizes)
        return torch.tensor(self._labels, dtype=torch.long) if complete else None

    def add(self, record: UnitRecord, labels: torch.Tensor | None = None) -> None:
        """Append the pieces of one recorded batch (and its labels)."""
        layers = range(self.arch.num_layers)
        pieces = [record.embedding, *(p for layer in layers for p in (record.heads[layer], record.mlps[layer]))]
        pieces = torch.stack(pieces, dim=1).float().cpu()
        self._sizes.append(len(pieces))
        if labels is not None:
            self._labels.extend(torch.as_tensor(labels).tolist())
            self._labelled_batches += 1
        self._count += len(pieces)
        if self._directory is None and self.nbytes > self.max_bytes:
            self._spill()
        if self._directory is not None:
            with open(self._directory / "pieces.f32", "ab") as handle:
                handle.write(pieces.numpy().data)  # the buffer itself: no copy
        else:
            self._chunks.append(pieces)

    def _spill(self) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="residual-units-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._directory, True)
        with open(self._directory / "pieces.f32", "wb") as handle:
            for chunk in self._chunks:
                handle.write(chunk.numpy().data)
        self._chunks = []

    def pieces(self, start: int, stop: int) -> torch.Tensor:
        """Pieces of images ``start:stop``, ``[stop - start, 2L + 1, hidden]``."""
        if self._directory is None:
            if len(self._chunks) > 1:
                self._chunks = [torch.cat(self._chunks)]
            return self._chunks[0][start:stop]
        # a positioned read, not a memory map: a map would keep every page it touched in the resident set
        stop, per_image = min(stop, self._count), int(np.prod(self.piece_shape))
        count, offset = max(stop - start, 0) * per_image, start * per_image * 4
        pieces = np.fromfile(self._directory / "pieces.f32", dtype=np.float32, count=count, offset=offset)
        return torch.from_numpy(pieces).view(-1, *self.piece_shape)

    def records(self, batch_size: int = RECORD_BATCH) -> Iterator[pca.RecordedBatch]:
        """``(record, labels)`` of consecutive batches, as if the backbone had just run on them."""
        labels = self.labels
        for start in range(0, self._count, batch_size):
            yield self.recorded(start, start + batch_size, labels)

    def recorded(self, start: int, stop: int, labels: torch.Tensor | None = None) -> pca.RecordedBatch:
        """Images ``start:stop`` as a batch the backbone had just run on (``labels``: :attr:`labels`, if known)."""
        pieces = self.pieces(start, stop)
        record = UnitRecord(embedding=pieces[:, 0])
        for layer in range(self.arch.num_layers):
            record.heads[layer], record.mlps[layer] = pieces[:, 1 + 2 * layer], pieces[:, 2 + 2 * layer]
        labels = self.labels if labels is None else labels
        return pca.RecordedBatch(
            record, None if labels is None else labels[start : start + len(pieces)], self.image_size
        )

    @torch.no_grad()
    def contributions(self, ln_mean: str = "shared") -> torch.Tensor:
        """Every stored image's direct contributions, ``[n, units, output_dim]`` float32 (held in memory)."""
        return torch.cat([batch.record.contributions(self.arch, ln_mean) for batch in self.records()])

    def identity(self) -> dict[str, str]:
        """Hashes of every stored image's pieces and of every label (for run checkpoints)."""
        images = hashlib.blake2b(str(self._count).encode(), digest_size=8)
        for start in range(0, self._count, 4096):
            images.update(self.pieces(start, min(start + 4096, self._count)).numpy().data)
        labels = "none" if self.labels is None else content_hash(self.labels)
        return {"images": images.hexdigest(), "labels": labels}

    def close(self) -> None:
        """Delete any spill file now."""
        if self._cleanup is not None:
            self._cleanup()
        self._directory = None


@torch.no_grad()
def base_embeddings(store: UnitStore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base model's embeddings of the stored images (their units' sum, exactly) and their labels."""
    features = [batch.record.contributions(store.arch).sum(1) for batch in store.records()]
    return torch.cat(features), store.labels


def collect_units(
    model: nn.Module,
    batches: Iterable,
    max_bytes: int | None = None,
    progress: bool = True,
    desc: str = "Units",
    label_column: str = "label",
) -> UnitStore:
    """One backbone pass over ``batches``, keeping every image's raw pieces (and labels from ``label_column``) in a
    :class:`UnitStore`: enough to compute class centroids, fit the bases and cache the training scores.

    Example:
        >>> test_units = collect_units(peft_model, DataLoader(test, batch_size=64))
    """
    arch = architecture_of(model)
    store = UnitStore(arch, max_bytes)
    bar = tqdm(total=_images_in(batches), unit="img", desc=desc, disable=not progress)  # images/s, ETA if known
    for batch in pca.recorded_batches(arch, batches, desc, label_column):
        store.add(batch.record, batch.labels)
        store.image_size = batch.image_size
        bar.update(len(batch.record.embedding))
    bar.close()
    if len(store) == 0:
        raise ResiDualInputError(f"{desc}: no images; the data set is empty.")
    return store


def _images_in(batches: Iterable) -> int | None:
    """How many images a DataLoader's data set holds, if it knows (a streamed one does not)."""
    try:
        return len(batches.dataset) if isinstance(batches, DataLoader) else None
    except TypeError:
        return None


def fit_residual_bases(
    model: nn.Module,
    data: Iterable | UnitStore,
    adapter_name: str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    keep_units: bool = False,
    max_unit_bytes: int | None = None,
) -> pca.FitReport:
    """:func:`peft_residual.tuner.fit_residual_bases`, which also takes a :class:`UnitStore` (no backbone pass) and,
    with ``keep_units=True``, keeps the raw pieces of every image in ``FitReport.units`` (in memory up to
    ``max_unit_bytes``, then in a temporary file), so that the same images are cached for training without running
    the backbone again.

    Example:
        >>> report = fit_residual_bases(peft_model, DataLoader(train, batch_size=64), keep_units=True)
        >>> cache = encode_dataset(peft_model, report.units)
    """
    store = UnitStore(residual_tuner(model).arch, max_unit_bytes) if keep_units else None

    def keep(batch: pca.RecordedBatch) -> None:
        store.add(batch.record, batch.labels)
        store.image_size = batch.image_size

    if isinstance(data, UnitStore):  # no backbone, but minutes at scale: a bar over the stored batches
        total = -(-len(data) // RECORD_BATCH)
        data = tqdm(data.records(), desc="ResiDual PCA (recorded units)", total=total, disable=not progress)
        progress = False
    report = pca.fit_residual_bases(
        model, data, adapter_name, max_batches, progress, keep if store is not None else None
    )
    report.units = store
    return report
