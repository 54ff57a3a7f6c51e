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
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from schedulefree import AdamWScheduleFree
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ..classifiers import Classifier, LinearClassifier
from ..data import check_dataset, dataset_identity, stratified_split
from ..data.units import UnitStore, collect_units, content_hash
from ..errors import ResiDualInputError
from ..tuner import residual_tuner
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
    head: LinearClassifier | None = None
    """The trained linear head on the adapted embedding (``head="linear"``, or a classifier in
    ``modules_to_save``), at its best epoch; ``None`` when the classifier stayed frozen."""


HEADS = (None, "frozen", "linear")
"""What :func:`train_residual` does with the classifier: keep it frozen (``None``, ``"frozen"``), or train a linear
head that starts from it together with the scales (``"linear"``)."""
HEAD_LR = 1e-3
"""The default learning rate of a trained head (its own parameter group; the scales keep ``lr``)."""


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
        **_hyper_parameters(settings),
    }


def _hyper_parameters(settings: dict[str, Any]) -> dict[str, str]:
    """The hyper-parameters' part of a run's identity (:func:`run_identity`)."""
    return {"hyper-parameters": json.dumps(settings, sort_keys=True, default=str)}


def run_settings(
    lr: float | str, batch_size: int, max_epochs: int, patience: int, seed: int, head_lr: float | None = None
) -> dict[str, Any]:
    """The hyper-parameters a run's checkpoint records (``head_lr``: a run that trains a linear head); it resumes
    only under the same ones."""
    settings = {"lr": lr, "batch_size": batch_size, "max_epochs": max_epochs, "patience": patience, "seed": seed}
    return settings | ({"head": "linear", "head_lr": head_lr} if head_lr is not None else {})


def check_resumable(output_dir: str | Path, settings: dict[str, Any]) -> None:
    """Refuse, before any work, a checkpoint in ``output_dir`` of a run under other hyper-parameters
    (:func:`run_settings`): the rest of a run's identity (data, bases, classifier) is checked once they exist.

    Example:
        >>> check_resumable("out/checkpoint", run_settings(0.8, 64, 30, 5, 0))  # before the backbone pass
    """
    checkpoint = load_checkpoint(output_dir)
    if checkpoint is not None:
        _refuse_another_run(output_dir, checkpoint[1].get("identity"), _hyper_parameters(settings))


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
    head: str | None = None,
    head_lr: float = HEAD_LR,
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
    ``head="linear"`` trains a linear head on the adapted embedding together with the scales, on the same cache
    (one backbone pass still suffices), with its own rate ``head_lr``; it starts from ``classifier`` (class
    centroids or a text head, see :meth:`LinearClassifier.from_classifier`) and is returned in
    :attr:`TrainingResult.head`. An adapter whose ``modules_to_save`` holds the model's own classifier (a
    ``ViTForImageClassification`` or ``Dinov2ForImageClassification`` with ``modules_to_save=["classifier"]``)
    trains that head this way by default, and its trained weights are written into the adapter's copy, so
    ``save_pretrained`` saves them and the model's logits are the trained head's. DINOv2's classifier reads
    ``[CLS, mean of the patch tokens]``; the cache holds only the CLS units, so the head is trained on the adapted CLS
    and the patch-mean half of its weights is set to zero (the model's logits then equal the trained head's exactly).
    ``lr="auto"`` runs an LR range test first (for the scales, the head held at its start). With ``output_dir``,
    the main process writes an atomic checkpoint after every epoch (the head's state too), and the same call after
    an interruption resumes from the last completed epoch. A checkpoint of any other run is refused before any
    encoding, naming what differs (bases, classifier, the images or labels of either split, hyper-parameters);
    ``resume=False`` ignores it and starts fresh.

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
    saved_head = _saved_classifier(model, scales, classifier, head)
    trains_head = _trains_head(head, head_lr, saved_head)
    if eval_dataset is None:
        train_dataset, eval_dataset = stratified_split(train_dataset, val_fraction, seed, label_column)
    train_dataset, eval_dataset = (
        _recorded_if_streamed(model, dataset, batch_size, label_column, progress, split)
        for dataset, split in ((train_dataset, "train"), (eval_dataset, "val"))
    )
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        check_dataset(dataset, name, label_column, classifier.num_classes)
    settings = run_settings(lr, batch_size, max_epochs, patience, seed, head_lr if trains_head else None)
    identity, checkpoint = None, None
    if output_dir is not None:  # only a checkpointed run needs its identity (every label, or example, is hashed)
        identity = run_identity(scales, classifier, train_dataset, eval_dataset, label_column, **settings)
        checkpoint = _checkpoint_of_this_run(output_dir, identity) if resume else None

    classifier = classifier.to(accelerator.device)
    seconds: dict[str, float] = {}
    images = sum(d.layout.size if isinstance(d, UnitStore) else len(d) for d in (train_dataset, eval_dataset))
    location = _cache_location(cache, images, scales, max_cache_bytes)
    encoding = _Encoding(
        location, _cache_dir(location, cache_dir, output_dir, accelerator),
        content_hash(*scales.fitted_state) if location == "disk" else "", accelerator, label_column, batch_size,
        num_workers, classifier.num_classes, progress,
    )  # fmt: skip
    with _timed(seconds, "cache"):
        train = encoding.features(model, train_dataset, "train")
        val = encoding.features(model, eval_dataset, "val")
    trained = None
    if trains_head:  # starts from the frozen head, calibrated to the adapted embeddings' norm at the start
        norm = _mean_norm(scales, train, batch_size, accelerator)
        trained = LinearClassifier.from_classifier(classifier, norm, dtype=scales.values.dtype).to(scales.basis.device)
        classifier = trained
    if checkpoint is None and lr == "auto":
        with _timed(seconds, "lr_range"):
            lr = find_learning_rate(
                scales, classifier, train, seed=seed, batch_size=batch_size, accelerator=accelerator
            )
    lr = checkpoint[1]["lr"] if checkpoint is not None else float(lr)
    groups = [{"params": scales.params, "lr": lr}]
    if trained is not None:
        groups.append({"params": list(trained.parameters()), "lr": float(head_lr)})
    optimizer = AdamWScheduleFree(groups, lr=lr)
    stopping, best = EarlyStopping(patience, max_epochs), _snapshot(scales, trained)
    if checkpoint is not None:
        best = _restore(scales, trained, optimizer, stopping, *checkpoint)

    with _timed(seconds, "train"):
        loop = _EpochLoop(scales, classifier, optimizer, stopping, accelerator, batch_size, seed)
        best = loop.run(train, val, best, max_epochs, progress, on_epoch_end, output_dir, (lr, identity))
    _keep_best(model, scales, trained, saved_head, best)
    scales.config.training_summary = {
        "training_samples": len(train), "validation_samples": len(val), "learning_rate": lr,
        "best_validation_accuracy": round(stopping.best_accuracy, 4), "epochs": stopping.epoch,
        **({"head": "linear", "head_learning_rate": float(head_lr)} if trained is not None else {}),
    }  # fmt: skip
    seconds["total"] = time.perf_counter() - started
    return TrainingResult(
        lr=lr, best_val_accuracy=stopping.best_accuracy, best_epoch=stopping.best_epoch, epochs_run=stopping.epoch,
        cached=location != "streamed", cache_location=location, history=stopping.history, seconds=seconds,
        head=trained.float().requires_grad_(False) if trained is not None else None,
    )  # fmt: skip


def _trains_head(head: str | None, head_lr: float, saved_head: nn.Linear | None) -> bool:
    """Whether the run trains a linear head: asked for, or the adapter holds the model's classifier (unless
    ``head`` says otherwise, which :func:`_saved_classifier` refuses)."""
    head = "linear" if head is None and saved_head is not None else head
    if head not in HEADS:
        raise ResiDualInputError(f"head must be one of {HEADS}, got {head!r}.")
    if head == "linear" and (isinstance(head_lr, bool) or not isinstance(head_lr, (int, float)) or head_lr <= 0):
        raise ResiDualInputError(f"head_lr must be a positive number, got {head_lr!r}.")
    return head == "linear"


def _cache_dir(
    location: str, cache_dir: str | Path | None, output_dir: str | Path | None, accelerator: Accelerator
) -> str | Path | None:
    """Where a disk cache goes: ``cache_dir``, else beside the checkpoints, else (one process only) a temporary
    directory (``None``)."""
    if location != "disk" or cache_dir is not None:
        return cache_dir
    if output_dir is not None:
        return Path(output_dir) / "unit-cache"
    if accelerator.num_processes > 1:
        raise ResiDualInputError(
            "The unit cache goes to disk, and every process must read the others' part of it: pass cache_dir (or "
            "output_dir), a directory all processes can read."
        )
    return None


def _keep_best(
    model: nn.Module,
    scales: ScaleSet,
    trained: LinearClassifier | None,
    saved_head: nn.Linear | None,
    best: tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> None:
    """Put the best epoch's scales into the model, and its head into the adapter's copy of the model's classifier
    where there is one (then saved with the adapter)."""
    _load(scales, trained, best)
    scales.write_back()
    if trained is not None and saved_head is not None:
        trained.copy_into(model)
    elif trained is not None and residual_tuner(model).arch.spec.classifier:
        logger.info(
            "The trained head is in TrainingResult.head; the model's own classifier is not in modules_to_save, so it "
            "stays as it was (ResiDualConfig(modules_to_save=['classifier']) trains and saves it with the adapter)."
        )


def _saved_classifier(model: nn.Module, scales: ScaleSet, classifier: Classifier, head: str | None) -> nn.Linear | None:
    """The adapter's trainable copy of the model's own classifier (``modules_to_save``), if it has one; any other
    module in ``modules_to_save`` is refused, since training on the cache reads nothing but the adapted
    embedding."""
    names = list(scales.config.modules_to_save or [])
    if not names:
        return None
    path = residual_tuner(model).arch.spec.classifier
    others = [name for name in names if path is None or not (path == name or path.endswith(f".{name}"))]
    if others:
        where = f"the model's classifier ({path!r})" if path else "a head on the adapted embedding"
        raise ResiDualInputError(
            f"Adapter '{scales.adapter}' also trains modules_to_save={names}, but train_residual trains, on cached "
            f"units of the frozen backbone, only the scales and {where}; {others} read something else. Train such "
            "an adapter with a loop that runs the model (e.g. transformers.Trainer), or drop them from "
            "modules_to_save."
        )
    if head == "frozen":
        raise ResiDualInputError(
            f"Adapter '{scales.adapter}' trains the model's classifier (modules_to_save={names}), but head='frozen' "
            "keeps it as it is; pass head='linear' (or leave head unset), or drop modules_to_save."
        )
    wrapper = residual_tuner(model).model.get_submodule(path)
    saved = dict(getattr(wrapper, "modules_to_save", {})).get(scales.adapter)  # PEFT's ModuleDict of copies
    dims = {"cls": 1, "cls+patch_mean": 2}[residual_tuner(model).arch.spec.classifier_input]
    expected = (classifier.num_classes, dims * scales.basis.shape[1])
    if not isinstance(saved, nn.Linear) or tuple(saved.weight.shape) != expected:
        shape = tuple(saved.weight.shape) if isinstance(saved, nn.Linear) else type(saved).__name__
        raise ResiDualInputError(
            f"The model's classifier is {shape}, but the head trained on the cache is a linear map of "
            f"{classifier.num_classes} classes, weight {expected}; build the model with "
            f"num_labels={classifier.num_classes}."
        )
    return saved


@torch.no_grad()
def _mean_norm(scales: ScaleSet, features: Features, batch_size: int, accelerator: Accelerator) -> float:
    """The mean norm of the adapted embeddings of ``features`` under the scales as they are."""
    total = torch.zeros((), dtype=torch.float64, device=scales.basis.device)
    for scores, offset, _, _ in global_batches(features, torch.arange(len(features)), batch_size, accelerator):
        total += scales.output(scores, offset).double().norm(dim=-1).sum()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return float(total) / len(features)


def _snapshot(scales: ScaleSet, head: LinearClassifier | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scales and the head's parameters as they are now."""
    tensors = {name: p.detach().clone() for name, p in head.named_parameters()} if head is not None else {}
    return scales.snapshot(), tensors


@torch.no_grad()
def _load(scales: ScaleSet, head: LinearClassifier | None, snapshot: tuple[torch.Tensor, dict]) -> None:
    scales.load(snapshot[0])
    for name, param in head.named_parameters() if head is not None else ():
        param.copy_(snapshot[1][name])


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
    if checkpoint is not None:
        _refuse_another_run(output_dir, checkpoint[1].get("identity"), identity)
    return checkpoint


def _refuse_another_run(output_dir: str | Path, saved: object, identity: dict[str, str]) -> None:
    """The error naming what differs between a checkpoint's run (``saved``) and this one, if anything does."""
    differ = [part for part in identity if not isinstance(saved, dict) or saved.get(part) != identity[part]]
    if differ:
        what = "an older format" if not isinstance(saved, dict) else "other " + ", ".join(differ)
        if "hyper-parameters" in differ and isinstance(saved, dict):  # which ones, with both values
            there, here = (json.loads(ids.get("hyper-parameters") or "{}") for ids in (saved, identity))
            keys = sorted(set(there) | set(here))
            changed = [
                f"{key} {there.get(key)} saved vs {here.get(key)} now"
                for key in keys
                if there.get(key) != here.get(key)
            ]
            what += f": {', '.join(changed)}"
        raise ResiDualInputError(
            f"{output_dir} holds the checkpoint of another run ({what}); pass resume=False (CLI: --overwrite) to "
            "start fresh there, or use a new output_dir."
        )


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

    @property
    def _head(self) -> LinearClassifier | None:
        return self.classifier if isinstance(self.classifier, LinearClassifier) else None

    def run(self, train, val, best, max_epochs, progress, on_epoch_end, output_dir, run) -> tuple:
        """Run the remaining epochs and return the best scales and head parameters (see :func:`_snapshot`);
        ``run`` is ``(lr, identity)`` for checkpoints."""
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
                best = _snapshot(self.scales, self._head)
            if output_dir is not None and accelerator.is_main_process:
                _save(output_dir, self.scales, self._head, self.optimizer, stopping, best, *run)
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
    head: LinearClassifier | None,
    optimizer: AdamWScheduleFree,
    stopping: EarlyStopping,
    best: tuple[torch.Tensor, dict[str, torch.Tensor]],
    lr: float,
    identity: dict[str, str],
) -> None:
    # per layer, as the adapter holds them, so the layout does not follow how the optimiser groups the scales
    state = optimizer.state[scales.values]
    named = {"lambda": scales.values, "best": best[0], **{f"optimizer.{name}": value for name, value in state.items()}}
    tensors = {f"{name}.{i}": part for name, value in named.items() for i, part in enumerate(scales.per_layer(value))}
    groups = {name: optimizer.param_groups[0][name] for name in _GROUP_SCALARS}
    extra = {}
    if head is not None:  # the head's parameters, its best ones and its optimiser state, by parameter name
        for name, param in head.named_parameters():
            tensors[f"head.{name}"], tensors[f"best_head.{name}"] = param, best[1][name]
            tensors.update({f"head_optimizer.{name}.{key}": v for key, v in optimizer.state[param].items()})
        extra["head_optimizer"] = {name: optimizer.param_groups[1][name] for name in _GROUP_SCALARS}
    state = {**stopping.state(), "optimizer": groups, **extra, "lr": lr, "identity": identity}
    save_checkpoint(directory, tensors, state)


def _restore(
    scales: ScaleSet,
    head: LinearClassifier | None,
    optimizer: AdamWScheduleFree,
    stopping: EarlyStopping,
    tensors: dict[str, torch.Tensor],
    state: dict,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    def joined(name: str) -> torch.Tensor:
        return torch.cat([tensors[f"{name}.{i}"] for i in range(len(scales.sizes))]).to(scales.values.device)

    scales.load(joined("lambda"))
    names = {key.split(".")[1] for key in tensors if key.startswith("optimizer.")}
    optimizer.state[scales.values] = {name: joined(f"optimizer.{name}") for name in sorted(names)}
    optimizer.param_groups[0].update({name: state["optimizer"][name] for name in _GROUP_SCALARS})
    best_head = {}
    if head is not None:
        optimizer.param_groups[1].update({name: state["head_optimizer"][name] for name in _GROUP_SCALARS})
        for name, param in head.named_parameters():
            device = param.device
            with torch.no_grad():
                param.copy_(tensors[f"head.{name}"])
            best_head[name] = tensors[f"best_head.{name}"].to(device)
            prefix = f"head_optimizer.{name}."
            state_of = {key[len(prefix) :]: v.to(device) for key, v in tensors.items() if key.startswith(prefix)}
            optimizer.state[param] = state_of
    for key, value in stopping.state().items():
        setattr(stopping, key, state.get(key, value))
    return joined("best"), best_head
