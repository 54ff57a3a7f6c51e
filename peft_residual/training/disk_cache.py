"""The unit cache on disk: scores, offsets and labels written shard by shard, read back one batch at a time.

Each process appends the batches it encodes to its own three flat files of float32 (int64 for labels) rows in a
directory all processes can read. After every shard (one encoded batch) it records how many rows are complete in
``progress.r{rank}.json``, written to a temporary name and renamed, so that an encoding killed at any moment resumes
at its last complete shard: rows past the recorded count are cut off and the images from there are encoded again.
The record also holds an identity of what was encoded (bases, images, labels, batch size, processes); a directory
holding another encoding is started afresh. Commits survive the process being killed, not the machine losing power
(no fsync).

Reading takes each batch's rows with positioned reads (``os.pread``), so resident memory is one batch whatever the
data set's size; a memory map would keep every page it touched in the process's resident set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.units import ShardLayout, UnitStore
from ..errors import ResiDualInputError
from ..inference import check_labels
from ..tuner import active_adapter, residual_tuner
from .cache import CACHE_DTYPE, Batch, EncodeOptions, encode_batch, encode_recorded
from .scales import TILE

logger = logging.getLogger(__name__)

_PARTS = {"scores": np.float32, "offset": np.float32, "labels": np.int64}


def _path(directory: Path, part: str, rank: int) -> Path:
    return directory / f"{part}.r{rank}.bin"


class ShardWriter:
    """Appends one process's encoded batches to ``directory`` and commits each; resumes a killed encoding.

    Example:
        >>> writer = ShardWriter(directory, rank=0, identity=run_hash, widths={"scores": 96, "offset": 32})
        >>> writer.rows  # committed by an earlier run with this identity: skip those images
        >>> writer.append(scores, offset, labels)  # committed: a kill after this keeps these rows
    """

    def __init__(self, directory: Path, rank: int, identity: str, widths: dict[str, int]) -> None:
        self.directory, self.rank, self.identity = Path(directory), rank, identity
        self.widths = {**widths, "labels": 1}
        self.directory.mkdir(parents=True, exist_ok=True)
        self.progress = self.directory / f"progress.r{rank}.json"
        self.rows = self._committed_rows()
        """Rows already committed (by an earlier, interrupted run with the same identity)."""
        for part in _PARTS:
            with open(_path(self.directory, part, rank), "ab") as handle:
                handle.truncate(self.rows * self._row_bytes(part))  # drop an uncommitted tail

    def _row_bytes(self, part: str) -> int:
        return self.widths[part] * np.dtype(_PARTS[part]).itemsize

    def _committed_rows(self) -> int:
        if not self.progress.exists():
            return 0
        state = json.loads(self.progress.read_text())
        if state.get("identity") != self.identity:
            logger.warning("%s holds the unit cache of another encoding; encoding afresh.", self.directory)
            return 0
        if state.get("rows"):
            logger.info("Resuming the unit cache in %s after %d committed rows.", self.directory, state["rows"])
        return int(state["rows"])

    def append(self, scores: torch.Tensor, offset: torch.Tensor, labels: torch.Tensor) -> None:
        """Write one batch's rows and commit them."""
        for part, tensor in (("scores", scores), ("offset", offset), ("labels", labels)):
            rows = tensor.detach().to("cpu", torch.float32 if part != "labels" else torch.int64)
            with open(_path(self.directory, part, self.rank), "ab") as handle:
                handle.write(rows.contiguous().numpy().data)
        self.rows += len(labels)
        self.commit(done=False)

    def commit(self, done: bool) -> None:
        staged = self.progress.with_name(self.progress.name + ".tmp")
        staged.write_text(json.dumps({"identity": self.identity, "rows": self.rows, "done": done}))
        os.replace(staged, self.progress)

    def close(self) -> None:
        """Mark the encoding complete."""
        self.commit(done=True)


class DiskUnitCache:
    """A :class:`~.cache.UnitCache` whose scores and offsets stay on disk: the same batches, read when needed.

    The rows of a data set encoded by the processes of ``layout`` (see :class:`~peft_residual.data.ShardLayout`),
    each into its own files: global row ``i`` lies in the files of the process that held its batch.

    Example:
        >>> cache = DiskUnitCache(directory, ShardLayout((64, 64, 10)), widths={"scores": 96, "offset": 32})
        >>> scores, offset, labels = next(cache.batches([torch.arange(64)]))
    """

    granule = TILE

    def __init__(
        self, directory: Path, layout: ShardLayout, widths: dict[str, int], device: torch.device | str = "cpu"
    ) -> None:
        self.directory, self.size, self.world = Path(directory), layout.size, layout.world
        self.widths, self.device = widths, torch.device(device)
        self._fds = {
            (part, rank): os.open(_path(self.directory, part, rank), os.O_RDONLY)
            for part in ("scores", "offset")
            for rank in range(self.world)
        }
        for fd in self._fds.values():  # shuffled rows: readahead would read (and cache) ~4 rows per row wanted
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._owner, self._local = layout.locate()
        per_rank = [np.fromfile(_path(self.directory, "labels", rank), dtype=np.int64) for rank in range(self.world)]
        rows_before = torch.tensor([0, *np.cumsum([len(labels) for labels in per_rank])[:-1]], dtype=torch.long)
        self.labels = torch.from_numpy(np.concatenate(per_rank))[rows_before[self._owner] + self._local]
        """All labels, in the data set's order (small enough to hold)."""

    def __len__(self) -> int:
        return self.size

    def _read(self, part: str, rank: int, row: int) -> np.ndarray:
        width = self.widths[part]
        raw = os.pread(self._fds[part, rank], width * 4, row * width * 4)
        return np.frombuffer(raw, dtype=np.float32)

    def rows(self, indices: torch.Tensor) -> Batch:
        """``(scores, offset, labels)`` of the images at ``indices``."""
        ranks, local = self._owner[indices], self._local[indices]
        parts = []
        for part in ("scores", "offset"):
            rows = [self._read(part, int(r), int(i)) for r, i in zip(ranks, local, strict=True)]
            stacked = np.stack(rows) if rows else np.zeros((0, self.widths[part]), dtype=np.float32)
            parts.append(torch.from_numpy(stacked).to(self.device, CACHE_DTYPE))
        return parts[0], parts[1], self.labels[indices].to(self.device)

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
        for indices in index_batches:
            yield self.rows(indices)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()


@torch.no_grad()
def encode_to_disk(
    model: nn.Module,
    dataset: Dataset | UnitStore,
    directory: str | Path | None,
    identity: str,
    accelerator: Accelerator | None = None,
    options: EncodeOptions | None = None,
) -> DiskUnitCache:
    """:func:`~.cache.encode_dataset` into ``directory`` instead of memory; an interrupted encoding with the same
    ``identity`` there resumes at its last complete shard, a finished one is read as it is. ``directory=None`` (one
    process only) encodes into a temporary directory that goes with the returned cache.

    Example:
        >>> cache = encode_to_disk(peft_model, train_dataset, "cache/train", identity=run_hash)
    """
    options = options or EncodeOptions()
    batch_size, desc = options.batch_size, options.desc
    if len(dataset) == 0:
        raise ResiDualInputError(f"{desc}: the data set is empty.")
    tuner = residual_tuner(model)
    widths = {"scores": len(tuner.readout.components(active_adapter(tuner)).basis), "offset": tuner.arch.output_dim}
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    temporary = directory is None
    if temporary and world > 1:
        raise ResiDualInputError(f"{desc}: {world} processes need a directory they all read; pass one.")
    directory = Path(tempfile.mkdtemp(prefix="residual-cache-") if temporary else directory)
    if isinstance(dataset, UnitStore):  # in the batches the units were recorded in
        layout, mine = dataset.shard_of(world, rank)
        sizes = [dataset.batch_sizes[batch] for batch in mine]
    else:
        layout = ShardLayout(tuple(len(batch) for batch in torch.arange(len(dataset)).split(batch_size)), world, rank)
        mine = layout.mine()
        sizes = [layout.batch_sizes[batch] for batch in mine]
    writer = ShardWriter(directory, rank, identity, widths)
    done = sum(1 for end in np.cumsum(sizes) if end <= writer.rows)
    shown = options.progress and rank == 0
    bar = tqdm(total=sum(sizes), initial=writer.rows, unit="img", desc=desc, disable=not shown)
    batches = _batches(dataset, mine[done:], batch_size, options.label_column, options.num_workers)
    for step, (pixel_values, record, labels) in zip(mine[done:], batches, strict=True):
        where = f"{desc} batch {step}"
        if record is None:
            scores, offset = encode_batch(model, pixel_values, where)
        else:
            scores, offset = encode_recorded(model, record, where, batch_size)
        writer.append(scores, offset, check_labels(torch.as_tensor(labels), options.num_classes, where))
        bar.update(len(labels))
    bar.close()
    writer.close()
    if accelerator is not None and world > 1:
        accelerator.wait_for_everyone()  # every process's files are complete before any reads them
    device = next(tuner.model.parameters()).device
    cache = DiskUnitCache(directory, layout, widths, device)
    if temporary:
        weakref.finalize(cache, shutil.rmtree, directory, True)
    return cache


def _batches(
    dataset: Dataset | UnitStore, batches: list[int], batch_size: int, label_column: str, num_workers: int
) -> Iterator[tuple]:
    """``(pixel_values, record, labels)`` of the batches numbered ``batches``: images to encode (in batches of
    ``batch_size``), or stored units already recorded."""
    if isinstance(dataset, UnitStore):
        if dataset.labels is None:
            raise ResiDualInputError("The stored units have no labels; collect them from batches with labels.")
        for recorded in dataset.recorded_batches(batches):
            yield None, recorded.record, recorded.labels
        return
    samplers = [list(range(batch * batch_size, min((batch + 1) * batch_size, len(dataset)))) for batch in batches]
    for batch in DataLoader(dataset, batch_sampler=samplers, num_workers=num_workers):
        yield batch["pixel_values"], None, batch[label_column]
