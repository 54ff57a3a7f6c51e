"""Raw CLS pieces of many images, kept once so that fitting, caching and scoring need one backbone pass.

Per image the pieces are ``(2L + 1) x hidden`` floats (the embedding, each layer's concatenated head outputs and MLP
output at CLS); every unit contribution, the final norm's statistics included, follows from them exactly (see
:class:`~..records.UnitRecord`). The store keeps them in memory up to a byte budget and spills everything to a
file in a temporary directory beyond it; the file goes when the store is closed or collected.

Under several processes, ``collect_units(..., accelerator=)`` shards the pass by whole batches: process ``r`` records
batches ``r, r + world, ...`` and keeps only those (:class:`ShardLayout`). The fit, the class centroids and the
training cache then combine the shards across processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import ResiDualInputError
from ..models import Architecture, architecture_of
from ..recording import RecordedBatch, recorded_batches
from ..records import UnitRecord
from ..tuner import pca
from ..tuner.decomposition import contributions
from ..tuner.model import residual_tuner

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 2**30
READ_BACK_BYTES = 16 * 2**20
"""What a batch of stored units read back may take as float32 unit contributions: their computation allocates a few
tensors of that size, and glibc maps any allocation beyond 32 MB afresh, page by page, every time (at 256 CLIP-B/32
images per batch the fit spent a third of its time in page faults)."""


def content_hash(*tensors: torch.Tensor) -> str:
    """A short hash of the tensors' shapes, dtypes and bytes."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardLayout:
    """How a data set's images lie among processes: its batches, in order, are dealt out in turn, batch ``b`` to
    process ``b % world``, which keeps its batches in order.

    Example:
        >>> ShardLayout(batch_sizes=(64, 64, 10), world=2).locate()  # rows 0-63 and 128-137 on process 0
    """

    batch_sizes: tuple[int, ...]
    """Every batch of the data set, in order."""
    world: int = 1
    rank: int = 0
    """This process."""

    @property
    def size(self) -> int:
        return sum(self.batch_sizes)

    def mine(self) -> list[int]:
        """Which batches this process holds."""
        return list(range(self.rank, len(self.batch_sizes), self.world))

    def locate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image of the data set, the process holding it and its row among that process's images."""
        sizes = torch.tensor(self.batch_sizes, dtype=torch.long)
        batch = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        within = torch.arange(len(batch)) - (torch.cumsum(sizes, 0) - sizes)[batch]
        owner = torch.arange(len(sizes)) % self.world
        rows_before = torch.zeros(len(sizes), dtype=torch.long)  # per batch, its owner's rows in earlier batches
        for rank in range(self.world):
            owned = sizes[rank :: self.world]
            rows_before[rank :: self.world] = torch.cumsum(owned, 0) - owned
        return owner[batch], rows_before[batch] + within


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
        self._shard: ShardLayout | None = None

    def __len__(self) -> int:
        """The images held here (this process's shard, if sharded)."""
        return self._count

    @property
    def batch_sizes(self) -> list[int]:
        """The sizes of the batches held here, in the order they were recorded."""
        return list(self._sizes)

    @property
    def layout(self) -> ShardLayout:
        """Where the data set's images lie: all here in the batches they were recorded in, unless sharded."""
        return self._shard or ShardLayout(tuple(self._sizes))

    @property
    def sharded(self) -> bool:
        """Whether this process holds only its shard of the data set (``collect_units(..., accelerator=)``)."""
        return self.layout.world > 1

    def shard_of(self, world: int, rank: int) -> tuple[ShardLayout, list[int]]:
        """The layout of an encoding by ``world`` processes, and which of the batches held here process ``rank``
        encodes: its shard when sharded, else every ``world``-th recorded batch."""
        if self.sharded:
            if (world, rank) != (self.layout.world, self.layout.rank):
                raise ResiDualInputError(
                    f"These units are process {self.layout.rank}'s shard of {self.layout.world}, but {world} "
                    "processes read them here; use the processes that collected them."
                )
            return self.layout, list(range(len(self._sizes)))
        layout = ShardLayout(tuple(self._sizes), world, rank)
        return layout, layout.mine()

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
        with open(self._directory / "pieces.f32", "rb") as handle:
            pieces = np.fromfile(handle, dtype=np.float32, count=count, offset=offset)
            # each phase reads the store once, in order; its pages, kept, would evict the training cache's, which
            # every epoch reads at random (at 300,000 images: a 25 GB store beside a 13 GB cache in 24 GB of RAM)
            os.posix_fadvise(handle.fileno(), offset, count * 4, os.POSIX_FADV_DONTNEED)
        return torch.from_numpy(pieces).view(-1, *self.piece_shape)

    def recorded_batches(self, batches: list[int]) -> Iterator[RecordedBatch]:
        """The batches numbered ``batches`` (in the order recorded here), as recorded."""
        starts = np.cumsum([0, *self._sizes])
        labels = self.labels
        for batch in batches:
            yield self.recorded(int(starts[batch]), int(starts[batch + 1]), labels)

    @property
    def read_batch(self) -> int:
        """Images per batch when the units are read back (:data:`READ_BACK_BYTES`, at most 256)."""
        per_image = self.arch.num_units * max(self.arch.hidden_size, self.arch.output_dim) * 4
        return max(1, min(256, READ_BACK_BYTES // per_image))

    def records(self, batch_size: int | None = None) -> Iterator[RecordedBatch]:
        """``(record, labels)`` of consecutive batches (of :attr:`read_batch` images by default), as if the backbone
        had just run on them."""
        batch_size = batch_size or self.read_batch
        labels = self.labels
        for start in range(0, self._count, batch_size):
            yield self.recorded(start, start + batch_size, labels)

    def recorded(self, start: int, stop: int, labels: torch.Tensor | None = None) -> RecordedBatch:
        """Images ``start:stop`` as a batch the backbone had just run on (``labels``: :attr:`labels`, if known)."""
        pieces = self.pieces(start, stop)
        record = UnitRecord.from_pieces(pieces)
        labels = self.labels if labels is None else labels
        return RecordedBatch(record, None if labels is None else labels[start : start + len(pieces)], self.image_size)

    @torch.no_grad()
    def contributions(self, ln_mean: str = "shared") -> torch.Tensor:
        """Every stored image's direct contributions, ``[n, units, output_dim]`` float32 (held in memory)."""
        return torch.cat([contributions(batch.record, self.arch, ln_mean) for batch in self.records()])

    def identity(self) -> dict[str, str]:
        """Hashes of every stored image's pieces and of every label (for run checkpoints); of every process's shard,
        the same on each, when sharded."""
        images = hashlib.blake2b(str(self._count).encode(), digest_size=8)
        for start in range(0, self._count, self.read_batch):
            images.update(self.pieces(start, start + self.read_batch).numpy().data)
        labels = "none" if self.labels is None else content_hash(self.labels)
        identity = {"images": images.hexdigest(), "labels": labels}
        if not self.sharded:
            return identity
        shards = gather_object([identity])
        joined = {part: " ".join(shard[part] for shard in shards) for part in identity}
        return {part: hashlib.blake2b(text.encode(), digest_size=8).hexdigest() for part, text in joined.items()}

    def close(self) -> None:
        """Delete any spill file now."""
        if self._cleanup is not None:
            self._cleanup()
        self._directory = None


@torch.no_grad()
def base_embeddings(store: UnitStore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base model's embeddings of the stored images (their units' sum, exactly) and their labels."""
    features = [contributions(batch.record, store.arch).sum(1) for batch in store.records()]
    return torch.cat(features), store.labels


def collect_units(
    model: nn.Module,
    batches: Iterable,
    max_bytes: int | None = None,
    progress: bool = True,
    desc: str = "Units",
    label_column: str = "label",
    accelerator: Accelerator | None = None,
) -> UnitStore:
    """One backbone pass over ``batches``, keeping every image's raw pieces (and labels from ``label_column``) in a
    :class:`UnitStore`: enough to compute class centroids, fit the bases and cache the training scores.

    With an ``accelerator`` of several processes, each records and keeps only its shard of the batches (see
    :class:`ShardLayout`); every process must see the same ``batches``. A DataLoader of fewer batches than
    processes is recorded whole by every process. Fit, centroids and training then combine
    the shards.

    Example:
        >>> test_units = collect_units(peft_model, DataLoader(test, batch_size=64))
    """
    arch = architecture_of(model)
    store = UnitStore(arch, max_bytes)
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    if world > 1 and _batches_in(batches) is not None and _batches_in(batches) < world:
        logger.info("%s: %d batch(es) for %d processes; every process records all of them.", desc,
                    _batches_in(batches), world)  # fmt: skip
        world, rank = 1, 0
    total = _images_in(batches)
    shown = progress and rank == 0
    bar = tqdm(total=total and -(-total // world), unit="img", desc=desc, disable=not shown)  # images/s, ETA if known
    for batch in recorded_batches(arch, _shard(batches, world, rank), desc, label_column):
        store.add(batch.record, batch.labels)
        store.image_size = batch.image_size
        bar.update(len(batch.record.embedding))
    bar.close()
    per_process = gather_object([store._sizes]) if world > 1 else [store._sizes]
    if not all(per_process):  # on every process alike, so that none waits for the others in the fit
        empty = "the data set is empty" if world == 1 else f"give more batches than the {world} processes"
        raise ResiDualInputError(f"{desc}: no images for a process; {empty}.")
    if world > 1:  # every process learns the sizes of every batch, to find any image among the shards
        sizes = [per_process[b % world][b // world] for b in range(sum(map(len, per_process)))]
        store._shard = ShardLayout(tuple(sizes), world, rank)
    return store


def _shard(batches: Iterable, world: int, rank: int) -> Iterable:
    """Batches ``rank, rank + world, ...`` of ``batches``: a DataLoader loads only those."""
    if world == 1:
        return batches
    if isinstance(batches, DataLoader) and batches.batch_sampler is not None:
        sampler = BatchSamplerShard(batches.batch_sampler, world, rank, even_batches=False)
        return DataLoader(
            batches.dataset, batch_sampler=sampler, collate_fn=batches.collate_fn, num_workers=batches.num_workers
        )
    return islice(batches, rank, None, world)


def _batches_in(batches: Iterable) -> int | None:
    """How many batches a DataLoader over a sized data set yields, if it knows."""
    try:
        return len(batches) if isinstance(batches, DataLoader) else None
    except TypeError:
        return None


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
    """Fit every unit's PCA basis and mean on reference images, then initialise the scales: the tuner's
    :func:`~peft_residual.tuner.get_residual_bases`, then :func:`~peft_residual.tuner.apply_residual_bases`, which
    records the image size and base model in the config (``base_signature``). Refitting an adapter resets its scales
    to their initial values (a warning says so if they were trained).

    ``data`` is a loader of dicts with ``pixel_values`` (or tensors), all of one image size, or a
    :class:`UnitStore` (no backbone pass; one sharded across processes by ``collect_units(..., accelerator=)``
    gives every process the bases of all its shards). With ``keep_units=True`` the raw pieces of every image are
    kept in ``FitReport.units`` (in memory up to ``max_unit_bytes``, then in a temporary file), so that the same
    images are cached for training without running the backbone again.

    Example:
        >>> report = fit_residual_bases(peft_model, DataLoader(train, batch_size=64), keep_units=True)
        >>> cache = encode_dataset(peft_model, report.units)
    """
    store = UnitStore(residual_tuner(model).arch, max_unit_bytes) if keep_units else None

    def keep(batch: RecordedBatch) -> None:
        store.add(batch.record, batch.labels)
        store.image_size = batch.image_size

    merge_processes = isinstance(data, UnitStore) and data.sharded
    if isinstance(data, UnitStore):  # no backbone, but minutes at scale: a bar over the stored batches
        total = -(-len(data) // data.read_batch)
        data = tqdm(data.records(), desc="ResiDual PCA (recorded units)", total=total, disable=not progress)
        progress = False
    bases = pca.get_residual_bases(
        model, data, adapter_name, max_batches, progress, keep if store is not None else None, merge_processes
    )
    pca.apply_residual_bases(model, bases)
    bases.report.units = store
    return bases.report
