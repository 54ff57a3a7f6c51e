"""Training the ResiDual scales against a frozen classifier, as in the paper's code.

Cross-entropy on ``classifier(adapted_output)``, schedule-free AdamW (lr 0.8, batch 64), at most 30 epochs, early
stopping with patience 5 on validation accuracy, best scales restored. Runs on the unit cache by default, end to end
through the model otherwise, and across processes with Accelerate: every process walks the same seeded global
batches, takes its ``rank::world`` share, and the scale gradients are summed across processes.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from schedulefree import AdamWScheduleFree
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .cache import UnitCache, available_memory_bytes, encode_dataset
from .checkpoint import load_checkpoint, save_checkpoint
from .classifiers import Classifier
from .decomposition import embed_images
from .layer import combine
from .pca import _residual_tuner

TRAINING_DTYPE = torch.float64
"""The scales train in float64: they are few, and exact sums make multi-process runs match single-process ones."""


@contextmanager
def _training_precision(run: _Run) -> Iterator[None]:
    """Hold the scales, and compute the readout, in :data:`TRAINING_DTYPE` for the block; float32 afterwards."""
    for param in run.params:
        param.data = param.data.to(TRAINING_DTYPE)
    run.readout.compute_dtype = TRAINING_DTYPE
    try:
        yield
    finally:
        run.readout.compute_dtype = torch.float32
        for param in run.params:
            param.data = param.data.float()


@dataclass
class TrainingResult:
    """Outcome of :func:`train_residual`; the model then holds the best scales."""

    lr: float
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    cached: bool
    history: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of the phases: ``cache`` (encoding), ``lr_range`` and ``train``."""


def default_accelerator() -> Accelerator:
    """An ``Accelerator`` that runs multi-process on CPUs (gloo) when no GPU is present, e.g. under
    ``accelerate launch --multi_gpu`` on a CPU-only machine."""
    return Accelerator(cpu=not torch.cuda.is_available())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy, computed here: ``evaluate.load("accuracy")`` fetches its metric script from the Hub and
    fails offline."""
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else math.nan


def stratified_split(
    dataset: datasets.Dataset, fraction: float, seed: int, label_column: str = "label"
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off ``fraction`` of ``dataset`` for validation, stratified by label, with ``datasets``' own split."""
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"The automatic validation split needs a datasets.Dataset, got {type(dataset).__name__}; "
            "pass eval_dataset yourself."
        )
    if label_column not in dataset.column_names:
        raise KeyError(f"No label column {label_column!r}; the dataset has {dataset.column_names}.")
    if not isinstance(dataset.features[label_column], datasets.ClassLabel):
        num_classes = max(dataset.with_format(None)[label_column]) + 1
        dataset = dataset.cast_column(label_column, datasets.ClassLabel(num_classes=num_classes))
    parts = dataset.train_test_split(test_size=fraction, stratify_by_column=label_column, seed=seed)
    return parts["train"], parts["test"]


@dataclass
class _Split:
    dataset: Dataset
    cache: UnitCache | None

    def __len__(self) -> int:
        return len(self.cache) if self.cache is not None else len(self.dataset)


class _Run:
    """What one training run needs at every step: the model, its scales, the classifier and the processes."""

    def __init__(self, model: nn.Module, classifier: Classifier, accelerator: Accelerator, label_column: str, workers):
        self.model = model
        self.tuner = _residual_tuner(model)
        self.adapter = self.tuner.active_adapters[0]
        self.readout = self.tuner.readout
        self.readout.check_fitted(self.adapter)
        self.params = [
            layer.residual_lambda[self.adapter]
            for layer in self.readout._layers_of(self.adapter)
            if layer.is_transformed(self.adapter)
        ]
        self.accelerator = accelerator
        self.classifier = classifier.to(accelerator.device)
        self.label_column = label_column
        self.num_workers = workers
        self.basis = self.readout.basis(self.adapter).to(accelerator.device, TRAINING_DTYPE)
        self.dtype = next(self.tuner.model.parameters()).dtype

    def batches(
        self, split: _Split, order: torch.Tensor, size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """``(logits, labels, global batch size)`` for this process's share of each global batch of ``order``."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        global_batches = list(order.split(size))
        local = [batch[rank::world] for batch in global_batches]
        if split.cache is not None:
            cache = split.cache
            for batch, mine in zip(global_batches, local, strict=True):
                scores, offset = cache.scores[mine].to(self.basis.dtype), cache.offset[mine].to(self.basis.dtype)
                adapted = combine(scores, offset, self.readout.lambdas(self.adapter), self.basis)
                yield self.classifier(adapted), cache.labels[mine], len(batch)
            return
        loader = DataLoader(split.dataset, batch_sampler=[m.tolist() for m in local], num_workers=self.num_workers)
        device = self.accelerator.device
        for images, batch in zip(loader, global_batches, strict=True):
            pixel_values = images["pixel_values"].to(device=device, dtype=self.dtype)
            labels = torch.as_tensor(images[self.label_column], device=device)
            yield self.classifier(embed_images(self.model, pixel_values)), labels, len(batch)

    def step(self, optimizer: AdamWScheduleFree, logits: torch.Tensor, labels: torch.Tensor, size: int) -> float:
        loss = F.cross_entropy(logits, labels, reduction="sum") / size
        loss.backward()
        if self.accelerator.num_processes > 1:
            for param in self.params:
                param.grad = self.accelerator.reduce(param.grad, "sum")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(self.accelerator.reduce(loss.detach(), "sum"))

    @torch.no_grad()
    def evaluate(self, split: _Split, batch_size: int) -> float:
        correct = torch.zeros((), device=self.accelerator.device)
        for logits, labels, _ in self.batches(split, torch.arange(len(split)), batch_size):
            correct += (logits.argmax(-1) == labels).sum()
        return float(self.accelerator.reduce(correct, "sum")) / len(split)


def find_learning_rate(
    run: _Run, split: _Split, seed: int, batch_size: int, start: float = 1e-3, end: float = 10.0, steps: int = 40
) -> float:
    """LR range test: raise the rate exponentially over ``steps`` steps and return the rate where the smoothed loss
    falls fastest. The scales are restored afterwards."""
    saved = [param.detach().clone() for param in run.params]
    rates = torch.logspace(math.log10(start), math.log10(end), steps).tolist()
    generator = torch.Generator().manual_seed(seed)
    repeats = math.ceil(steps * batch_size / len(split))
    order = torch.cat([torch.randperm(len(split), generator=generator) for _ in range(repeats)])
    optimizer = AdamWScheduleFree(run.params, lr=rates[0])
    optimizer.train()
    losses = []
    try:
        for rate, (logits, labels, size) in zip(rates, run.batches(split, order, batch_size), strict=False):
            for group in optimizer.param_groups:
                group["lr"] = rate
            loss = run.step(optimizer, logits, labels, size)
            losses.append(loss)
            if not math.isfinite(loss) or loss > 4 * min(losses):
                break
    finally:
        with torch.no_grad():
            for param, value in zip(run.params, saved, strict=True):
                param.copy_(value)
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses if math.isfinite(losses[-1]) else losses[:-1]):
        average = 0.8 * average + 0.2 * loss
        smoothed.append(average / (1 - 0.8 ** (i + 1)))
    if len(smoothed) < 3:
        return rates[0]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) for i in range(1, len(smoothed) - 1)]
    return rates[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def _fingerprint(run: _Run, **settings) -> dict:
    return {**settings, "scales": sum(p.numel() for p in run.params), "processes": run.accelerator.num_processes}


def _checkpoint_tensors(run: _Run, optimizer: AdamWScheduleFree, best: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, param in enumerate(run.params):
        tensors[f"lambda.{i}"] = param
        tensors[f"best.{i}"] = best[i]
        for name, value in optimizer.state[param].items():
            tensors[f"optimizer.{name}.{i}"] = value
    return tensors


_GROUP_SCALARS = ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode", "lr")


def _restore(run: _Run, optimizer: AdamWScheduleFree, tensors: dict[str, torch.Tensor], state: dict) -> list:
    with torch.no_grad():
        for i, param in enumerate(run.params):
            param.copy_(tensors[f"lambda.{i}"])
            names = [key.split(".")[1] for key in tensors if key.startswith("optimizer.") and key.endswith(f".{i}")]
            optimizer.state[param] = {name: tensors[f"optimizer.{name}.{i}"].to(param.device) for name in names}
    for group in optimizer.param_groups:
        group.update({name: state["optimizer"][name] for name in _GROUP_SCALARS})
    return [tensors[f"best.{i}"].to(param.device) for i, param in enumerate(run.params)]


def _use_cache(cache: bool | str, num_samples: int, basis_shape: torch.Size, max_bytes: int | None) -> bool:
    """Whether to train on the unit cache: always, never, or ("auto") when it fits the memory budget."""
    if cache not in (True, False, "auto"):
        raise ValueError(f"cache must be True, False or 'auto', got {cache!r}.")
    needed = UnitCache.bytes_needed(num_samples, basis_shape[0], basis_shape[1])
    budget = max_bytes if max_bytes is not None else available_memory_bytes() // 2
    if needed <= budget or cache is False:
        return bool(cache)
    if cache is True:
        raise MemoryError(
            f"The unit cache needs {needed / 2**20:.1f} MiB but the budget is {budget / 2**20:.1f} MiB; pass "
            "cache=False (end to end), a larger max_cache_bytes, or fewer samples."
        )
    warnings.warn(
        f"The unit cache would need {needed / 2**20:.1f} MiB (budget {budget / 2**20:.1f} MiB); training end to end "
        "through the backbone instead.",
        stacklevel=3,
    )
    return False


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
    output_dir: str | Path | None = None,
    label_column: str = "label",
    accelerator: Accelerator | None = None,
    num_workers: int = 0,
    progress: bool = True,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> TrainingResult:
    """Train the ResiDual scales of ``model`` (fitted with :func:`fit_residual_bases`) against ``classifier``.

    Datasets yield dicts with ``pixel_values`` and ``label_column``. Without ``eval_dataset``, a stratified
    ``val_fraction`` of ``train_dataset`` (a ``datasets.Dataset``) is held out with ``seed``. ``cache="auto"`` encodes
    both splits once into PCA scores when they fit in ``max_cache_bytes`` (default: half the available memory) and
    trains end to end otherwise; ``True`` insists on the cache, ``False`` never uses it. ``lr="auto"`` runs an LR
    range test first. With ``output_dir``, the main process writes an atomic checkpoint after every epoch, and the
    same call after an interruption resumes from the last completed epoch.

    Example:
        >>> result = train_residual(peft_model, classifier, train_dataset)
        >>> result.best_val_accuracy, result.epochs_run
    """
    accelerator = accelerator or default_accelerator()
    run = _Run(model, classifier, accelerator, label_column, num_workers)
    if eval_dataset is None:
        train_dataset, eval_dataset = stratified_split(train_dataset, val_fraction, seed, label_column)
    train, val = _Split(train_dataset, None), _Split(eval_dataset, None)
    seconds = {"cache": 0.0, "lr_range": 0.0, "train": 0.0}
    use_cache = _use_cache(cache, len(train) + len(val), run.basis.shape, max_cache_bytes)
    if use_cache:
        started = time.perf_counter()
        for split in (train, val):
            split.cache = encode_dataset(
                model, split.dataset, accelerator, label_column, batch_size, num_workers, progress
            )
        seconds["cache"] = time.perf_counter() - started

    checkpoint = load_checkpoint(output_dir) if output_dir is not None else None
    fingerprint = _fingerprint(
        run, batch_size=batch_size, max_epochs=max_epochs, patience=patience, seed=seed, train=len(train)
    )
    if checkpoint is not None and checkpoint[1]["fingerprint"] != fingerprint:
        raise ValueError(
            f"{output_dir} holds a checkpoint of another run ({checkpoint[1]['fingerprint']} vs {fingerprint}); "
            "use a new output_dir or delete the checkpoint."
        )
    if lr != "auto" and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
        raise ValueError(f"lr must be a positive number or 'auto', got {lr!r}.")

    with _training_precision(run):
        if checkpoint is not None:
            lr = checkpoint[1]["lr"]
        elif lr == "auto":
            started = time.perf_counter()
            lr = find_learning_rate(run, train, seed, batch_size)
            seconds["lr_range"] = time.perf_counter() - started
        optimizer = AdamWScheduleFree(run.params, lr=float(lr))
        best = [param.detach().clone() for param in run.params]
        state = {"epoch": 0, "best_accuracy": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [], "done": False}
        if checkpoint is not None:
            best = _restore(run, optimizer, *checkpoint)
            state = {key: checkpoint[1][key] for key in state}

        started = time.perf_counter()
        show = progress and accelerator.is_local_main_process and not state["done"]
        epochs = tqdm(range(state["epoch"], max_epochs), desc="ResiDual training", disable=not show)
        for epoch in epochs:
            if state["done"]:
                break
            optimizer.train()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            losses = [run.step(optimizer, *batch) for batch in run.batches(train, order, batch_size)]
            optimizer.eval()  # evaluate and checkpoint the averaged scales
            record = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses)}
            record["val_accuracy"] = run.evaluate(val, batch_size)
            state["history"].append(record)
            state["epoch"] = epoch + 1
            if record["val_accuracy"] > state["best_accuracy"]:
                state.update(best_accuracy=record["val_accuracy"], best_epoch=epoch + 1, bad_epochs=0)
                best = [param.detach().clone() for param in run.params]
            else:
                state["bad_epochs"] += 1
            state["done"] = state["bad_epochs"] >= patience or state["epoch"] >= max_epochs
            if output_dir is not None and accelerator.is_main_process:
                groups = {name: optimizer.param_groups[0][name] for name in _GROUP_SCALARS}
                meta = {**state, "optimizer": groups, "lr": float(lr), "fingerprint": fingerprint}
                save_checkpoint(output_dir, _checkpoint_tensors(run, optimizer, best), meta)
            accelerator.wait_for_everyone()
            epochs.set_postfix(loss=f"{record['train_loss']:.4f}", val_acc=f"{record['val_accuracy']:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(record)
        seconds["train"] = time.perf_counter() - started
        with torch.no_grad():
            for param, value in zip(run.params, best, strict=True):
                param.copy_(value)
    run.tuner.training_summary = {
        **getattr(run.tuner, "training_summary", {}),
        run.adapter: {
            "training_samples": len(train),
            "validation_samples": len(val),
            "best_validation_accuracy": round(state["best_accuracy"], 4),
            "epochs": state["epoch"],
            "learning_rate": float(lr),
        },
    }
    return TrainingResult(
        lr=float(lr),
        best_val_accuracy=state["best_accuracy"],
        best_epoch=state["best_epoch"],
        epochs_run=state["epoch"],
        cached=use_cache,
        history=state["history"],
        seconds=seconds,
    )
