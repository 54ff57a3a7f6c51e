"""Training the ResiDual scales against a frozen classifier, as in the paper's code.

Cross-entropy on ``classifier(adapted_output)``, schedule-free AdamW (lr 0.8, batch 64), at most 30 epochs, early
stopping with patience 5 on validation accuracy, best scales restored. Runs on the unit cache by default, streamed
through the backbone otherwise, and across processes with Accelerate (see :mod:`.steps`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from schedulefree import AdamWScheduleFree
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ..classifiers import Classifier
from ..data import check_dataset, dataset_identity, stratified_split
from ..data.units import UnitStore, collect_units, content_hash
from ..tuner.config import ResiDualInputError
from .cache import EncodeOptions, StreamedUnits, UnitCache, available_memory_bytes, encode_dataset
from .checkpoint import load_checkpoint, save_checkpoint
from .disk_cache import encode_to_disk
from .lr_finder import find_learning_rate
from .scales import ScaleSet
from .steps import Features, epoch_order, evaluate, global_batches, train_step

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """Outcome of :func:`train_residual`; the model then holds the best scales."""

    lr: float
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    cached: bool
    """Whether training read the unit cache (in memory or on disk) rather than streaming through the backbone."""
    cache_location: str = "memory"
    """``"memory"``, ``"disk"`` or ``"streamed"``."""
    history: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of the phases, ``cache`` (encoding), ``lr_range`` and ``train``, and ``total``, the whole call."""


def default_accelerator() -> Accelerator:
    """An ``Accelerator`` that runs multi-process on CPUs (gloo) when no GPU is present, e.g. under
    ``accelerate launch --multi_gpu`` on a CPU-only machine."""
    return Accelerator(cpu=not torch.cuda.is_available())


@dataclass
class EarlyStopping:
    """Patience on validation accuracy, keeping the best scales; its fields are the resumable training state."""

    patience: int
    max_epochs: int
    epoch: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    done: bool = False
    history: list[dict] = field(default_factory=list)

    def update(self, record: dict) -> bool:
        """Record an epoch; True if it is the best so far."""
        self.history.append(record)
        self.epoch = record["epoch"]
        improved = record["val_accuracy"] > self.best_accuracy
        if improved:
            self.best_accuracy, self.best_epoch, self.bad_epochs = record["val_accuracy"], self.epoch, 0
        else:
            self.bad_epochs += 1
        self.done = self.bad_epochs >= self.patience or self.epoch >= self.max_epochs
        return improved

    def state(self) -> dict:
        return {
            key: getattr(self, key) for key in ("epoch", "best_accuracy", "best_epoch", "bad_epochs", "done", "history")
        }


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started


def _check_arguments(lr: float | str, batch_size: int, max_epochs: int, patience: int, cache: bool | str) -> None:
    if lr != "auto" and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
        raise ResiDualInputError(f"lr must be a positive finite number or 'auto', got {lr!r}.")
    for name, value in (("batch_size", batch_size), ("max_epochs", max_epochs), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ResiDualInputError(f"{name} must be a positive int, got {value!r}.")
    if cache not in (True, False, "auto", "disk"):
        raise ResiDualInputError(f"cache must be True, False, 'auto' or 'disk', got {cache!r}.")


def _cache_location(cache: bool | str, num_samples: int, scales: ScaleSet, max_bytes: int | None) -> str:
    """Where the unit cache lives: in memory (``True``, or ``"auto"`` within the memory budget), on disk
    (``"disk"``, or ``"auto"`` beyond the budget), or nowhere (``False``: streamed through the backbone)."""
    if cache is False or cache == "disk":
        return "streamed" if cache is False else "disk"
    needed = UnitCache.bytes_needed(num_samples, *scales.basis.shape)
    budget = max_bytes if max_bytes is not None else available_memory_bytes() // 2
    if needed <= budget:
        return "memory"
    if cache is True:
        raise MemoryError(
            f"The unit cache needs {needed / 2**20:.1f} MiB but the budget is {budget / 2**20:.1f} MiB; pass "
            "cache='disk', a larger max_cache_bytes, or fewer samples."
        )
    logger.info("The unit cache needs %.1f MiB (budget %.1f MiB): keeping it on disk.", needed / 2**20, budget / 2**20)
    return "disk"


def run_identity(
    scales: ScaleSet, classifier: Classifier, train: Dataset, val: Dataset, label_column: str, **settings
) -> dict[str, str]:
    """Short hashes of every part a training run depends on, by name: the bases, the classifier, the images and
    labels of both splits and the hyper-parameters. A checkpoint resumes only when all of them match."""
    splits = {"training": dataset_identity(train, label_column), "validation": dataset_identity(val, label_column)}
    return {
        "bases": content_hash(*scales.fitted_state),
        "classifier": content_hash(classifier.weights, torch.tensor(float(classifier.scale))),
        **{f"{split} {part}": value for split, parts in splits.items() for part, value in parts.items()},
        "hyper-parameters": json.dumps(settings, sort_keys=True, default=str),
    }


def train_residual(
    model: nn.Module,
    classifier: Classifier,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    *,
    lr: float | str = 0.8,
    batch_size: int = 64,
    max_epochs: int = 30,
    patience: int = 5,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache: bool | str = "auto",
    max_cache_bytes: int | None = None,
    cache_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    label_column: str = "label",
    accelerator: Accelerator | None = None,
    num_workers: int = 0,
    progress: bool = True,
    on_epoch_end: Callable[[dict], None] | None = None,
    resume: bool = True,
) -> TrainingResult:
    """Train the ResiDual scales of ``model`` (fitted with :func:`fit_residual_bases`) against ``classifier``.

    Datasets yield dicts with ``pixel_values`` and ``label_column``, or are :class:`UnitStore` s of the same images
    (e.g. from ``collect_units``), which need no backbone pass; a streamed one (an ``IterableDataset`` of examples,
    ``streaming=True``, or any iterable of batches without ``len``) is recorded once into a store first. Without
    ``eval_dataset``, a stratified ``val_fraction`` of ``train_dataset`` (a ``datasets.Dataset``) is held out with
    ``seed``. Both splits are encoded once into PCA scores: ``cache="auto"`` keeps them in memory when they fit in
    ``max_cache_bytes`` (default: half the available memory) and on disk otherwise, ``True`` insists on memory,
    ``"disk"`` on disk, and ``False`` streams every batch through the backbone instead. A disk cache lives in
    ``cache_dir`` (default: ``output_dir/unit-cache`` when checkpointing, else a temporary directory), where an
    interrupted encoding resumes at its last complete shard; under several processes it must be a directory they
    all read.
    ``lr="auto"`` runs an LR range test first. With ``output_dir``, the main process writes an atomic checkpoint
    after every epoch, and the same call after an interruption resumes from the last completed epoch. A checkpoint
    of any other run is refused before any encoding, naming what differs (bases, classifier, the images or labels
    of either split, hyper-parameters); ``resume=False`` ignores it and starts fresh.

    Example:
        >>> result = train_residual(peft_model, classifier, train_dataset, lr=0.8)
        >>> result.best_val_accuracy, result.epochs_run
    """
    started = time.perf_counter()
    _check_arguments(lr, batch_size, max_epochs, patience, cache)
    accelerator = accelerator or default_accelerator()
    scales = ScaleSet(model, accelerator.device)
    if scales.config.inference_mode:
        raise ResiDualInputError(
            f"Adapter '{scales.adapter}' was loaded for inference (PeftModel.from_pretrained's default "
            "is_trainable=False); load it with is_trainable=True to train its scales."
        )
    if scales.config.modules_to_save:
        raise ResiDualInputError(
            f"Adapter '{scales.adapter}' also trains modules_to_save={scales.config.modules_to_save}, which "
            "train_residual cannot: it trains the scales on cached units of the frozen backbone. Train such an "
            "adapter with a loop that runs the model (e.g. transformers.Trainer), or drop modules_to_save."
        )
    if eval_dataset is None:
        train_dataset, eval_dataset = stratified_split(train_dataset, val_fraction, seed, label_column)
    train_dataset, eval_dataset = (
        _recorded_if_streamed(model, dataset, batch_size, label_column, progress, split)
        for dataset, split in ((train_dataset, "train"), (eval_dataset, "val"))
    )
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        check_dataset(dataset, name, label_column, classifier.num_classes)
    settings = {"lr": lr, "batch_size": batch_size, "max_epochs": max_epochs, "patience": patience, "seed": seed}
    identity, checkpoint = None, None
    if output_dir is not None:  # only a checkpointed run needs its identity (every label, or example, is hashed)
        identity = run_identity(scales, classifier, train_dataset, eval_dataset, label_column, **settings)
        checkpoint = _checkpoint_of_this_run(output_dir, identity) if resume else None

    classifier = classifier.to(accelerator.device)
    seconds: dict[str, float] = {}
    images = sum(d.layout.size if isinstance(d, UnitStore) else len(d) for d in (train_dataset, eval_dataset))
    location = _cache_location(cache, images, scales, max_cache_bytes)
    if location == "disk" and cache_dir is None and output_dir is not None:
        cache_dir = Path(output_dir) / "unit-cache"
    if location == "disk" and cache_dir is None and accelerator.num_processes > 1:
        raise ResiDualInputError(
            "The unit cache goes to disk, and every process must read the others' part of it: pass cache_dir (or "
            "output_dir), a directory all processes can read."
        )
    bases = content_hash(*scales.fitted_state) if location == "disk" else ""  # part of a disk cache's identity
    encoding = _Encoding(
        location, cache_dir, bases, accelerator, label_column, batch_size, num_workers, classifier.num_classes,
        progress,
    )  # fmt: skip
    with _timed(seconds, "cache"):
        train = encoding.features(model, train_dataset, "train")
        val = encoding.features(model, eval_dataset, "val")
    if checkpoint is None and lr == "auto":
        with _timed(seconds, "lr_range"):
            lr = find_learning_rate(
                scales, classifier, train, seed=seed, batch_size=batch_size, accelerator=accelerator
            )
    lr = checkpoint[1]["lr"] if checkpoint is not None else float(lr)
    optimizer = AdamWScheduleFree(scales.params, lr=lr)
    stopping, best = EarlyStopping(patience, max_epochs), scales.snapshot()
    if checkpoint is not None:
        best = _restore(scales, optimizer, stopping, *checkpoint)

    with _timed(seconds, "train"):
        loop = _EpochLoop(scales, classifier, optimizer, stopping, accelerator, batch_size, seed)
        best = loop.run(train, val, best, max_epochs, progress, on_epoch_end, output_dir, (lr, identity))
    scales.load(best)
    scales.write_back()
    scales.config.training_summary = {
        "training_samples": len(train), "validation_samples": len(val), "learning_rate": lr,
        "best_validation_accuracy": round(stopping.best_accuracy, 4), "epochs": stopping.epoch,
    }  # fmt: skip
    seconds["total"] = time.perf_counter() - started
    return TrainingResult(
        lr=lr, best_val_accuracy=stopping.best_accuracy, best_epoch=stopping.best_epoch, epochs_run=stopping.epoch,
        cached=location != "streamed", cache_location=location, history=stopping.history, seconds=seconds,
    )  # fmt: skip


def _recorded_if_streamed(
    model: nn.Module, dataset: object, batch_size: int, label_column: str, progress: bool, split: str
) -> Dataset | UnitStore:
    """A streamed data set (an ``IterableDataset`` of examples, or any iterable of batches without ``len``), recorded
    once into a :class:`UnitStore` (on disk beyond its budget): training needs to revisit and shuffle its images."""
    if isinstance(dataset, (IterableDataset, datasets.IterableDataset)):
        dataset = DataLoader(dataset, batch_size=batch_size)
    elif isinstance(dataset, UnitStore) or (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return dataset
    return collect_units(model, dataset, progress=progress, desc=f"Recording {split} units", label_column=label_column)


def _checkpoint_of_this_run(output_dir: str | Path, identity: dict[str, str]) -> tuple | None:
    """The checkpoint in ``output_dir`` to resume from, if any; a checkpoint of another run is an error that names
    what differs."""
    checkpoint = load_checkpoint(output_dir)
    if checkpoint is None:
        return None
    saved = checkpoint[1].get("identity")
    differ = [part for part in identity if not isinstance(saved, dict) or saved.get(part) != identity[part]]
    if differ:
        what = "an older format" if not isinstance(saved, dict) else "other " + ", ".join(differ)
        raise ResiDualInputError(
            f"{output_dir} holds the checkpoint of another run ({what}); pass resume=False (CLI: --overwrite) to "
            "start fresh there, or use a new output_dir."
        )
    return checkpoint


@dataclass
class _EpochLoop:
    """The epochs of one run: train, evaluate the averaged scales, stop early, checkpoint."""

    scales: ScaleSet
    classifier: Classifier
    optimizer: AdamWScheduleFree
    stopping: EarlyStopping
    accelerator: Accelerator
    batch_size: int
    seed: int

    def run(self, train, val, best, max_epochs, progress, on_epoch_end, output_dir, run) -> torch.Tensor:
        """Run the remaining epochs and return the best scales; ``run`` is ``(lr, identity)`` for checkpoints."""
        accelerator, stopping = self.accelerator, self.stopping
        show = progress and accelerator.is_local_main_process and not stopping.done
        epochs = tqdm(range(stopping.epoch, max_epochs), desc="ResiDual training", disable=not show)
        for epoch in epochs:
            if stopping.done:
                break
            self.optimizer.train()
            batches = global_batches(train, epoch_order(len(train), self.seed, epoch), self.batch_size, accelerator)
            losses = [train_step(self.scales, self.classifier, self.optimizer, b, accelerator) for b in batches]
            self.optimizer.eval()  # evaluate and checkpoint the averaged scales
            record = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses)}
            record["val_accuracy"] = evaluate(self.scales, self.classifier, val, self.batch_size, accelerator)
            if stopping.update(record):
                best = self.scales.snapshot()
            if output_dir is not None and accelerator.is_main_process:
                _save(output_dir, self.scales, self.optimizer, stopping, best, *run)
            accelerator.wait_for_everyone()
            epochs.set_postfix(loss=f"{record['train_loss']:.4f}", val_acc=f"{record['val_accuracy']:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(record)
        return best


@dataclass
class _Encoding:
    """How a run turns each split into what training reads (see :func:`train_residual`'s ``cache``)."""

    location: str
    cache_dir: str | Path | None
    bases: str
    """A hash of the fitted bases, part of a disk cache's identity."""
    accelerator: Accelerator
    label_column: str
    batch_size: int
    num_workers: int
    num_classes: int
    progress: bool

    def features(self, model: nn.Module, dataset: Dataset, split: str) -> Features:
        show = self.progress and self.accelerator.is_local_main_process
        options = EncodeOptions(
            self.label_column, self.batch_size, self.num_workers, show, self.num_classes, f"Caching {split} units"
        )
        if self.location == "streamed" and not isinstance(dataset, UnitStore):  # stored units: no backbone anyway
            return StreamedUnits(model, dataset, self.label_column, self.num_workers, self.num_classes)
        if self.location != "disk":
            return encode_dataset(model, dataset, self.accelerator, **asdict(options))
        if self.cache_dir is None:  # one process: a temporary directory, removed with the cache
            return encode_to_disk(model, dataset, None, "temporary", self.accelerator, options)
        identity = json.dumps(
            {"bases": self.bases, **dataset_identity(dataset, self.label_column), "batch_size": self.batch_size,
             "processes": self.accelerator.num_processes},
            sort_keys=True,
        )  # fmt: skip
        return encode_to_disk(model, dataset, Path(self.cache_dir) / split, identity, self.accelerator, options)


_GROUP_SCALARS = ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode", "lr")


def _save(
    directory: str | Path,
    scales: ScaleSet,
    optimizer: AdamWScheduleFree,
    stopping: EarlyStopping,
    best: torch.Tensor,
    lr: float,
    identity: dict[str, str],
) -> None:
    # per layer, as the adapter holds them, so the layout does not follow how the optimiser groups the scales
    state = optimizer.state[scales.values]
    named = {"lambda": scales.values, "best": best, **{f"optimizer.{name}": value for name, value in state.items()}}
    tensors = {f"{name}.{i}": part for name, value in named.items() for i, part in enumerate(scales.per_layer(value))}
    groups = {name: optimizer.param_groups[0][name] for name in _GROUP_SCALARS}
    save_checkpoint(directory, tensors, {**stopping.state(), "optimizer": groups, "lr": lr, "identity": identity})


def _restore(
    scales: ScaleSet,
    optimizer: AdamWScheduleFree,
    stopping: EarlyStopping,
    tensors: dict[str, torch.Tensor],
    state: dict,
) -> torch.Tensor:
    def joined(name: str) -> torch.Tensor:
        return torch.cat([tensors[f"{name}.{i}"] for i in range(len(scales.sizes))]).to(scales.values.device)

    scales.load(joined("lambda"))
    names = {key.split(".")[1] for key in tensors if key.startswith("optimizer.")}
    optimizer.state[scales.values] = {name: joined(f"optimizer.{name}") for name in sorted(names)}
    for group in optimizer.param_groups:
        group.update({name: state["optimizer"][name] for name in _GROUP_SCALARS})
    for key, value in stopping.state().items():
        setattr(stopping, key, state.get(key, value))
    return joined("best")
