"""Training loop for the baselines (LoRA, linear probe, full fine-tuning): the ResiDual recipe applied to other
parameters. Same loss (cross-entropy on the frozen classifier's logits), schedule-free AdamW, batch size, epochs,
early stopping on validation accuracy and best-state restore as :func:`peft_residual.train_residual`.

Learning rates follow a fixed rule set before any run, never tuned on validation or test data:
1e-3 for LoRA and the linear probe (new, small parameters), 1e-5 for full fine-tuning (all pretrained weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from schedulefree import AdamWScheduleFree
from torch import nn
from tqdm.auto import tqdm

LEARNING_RATES = {"lora": 1e-3, "linear_probe": 1e-3, "full_finetune": 1e-5}

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@torch.no_grad()
def _accuracy(logits_of: Callable, batches: Iterable) -> float:
    correct = total = 0
    for inputs, labels in batches:
        correct += int((logits_of(inputs).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


def train_parameters(
    params: list[nn.Parameter],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    train_batches: Batches,
    val_batches: Callable[[], Iterable],
    *,
    lr: float,
    max_epochs: int,
    patience: int,
    progress: bool = True,
) -> dict:
    """Train ``params``; ``train_batches(epoch)`` yields ``(inputs, labels)`` in that epoch's seeded order."""
    optimizer = AdamWScheduleFree(params, lr=lr)
    best_accuracy, best_epoch, bad_epochs, epochs_run = -1.0, 0, 0, 0
    best = [p.detach().clone() for p in params]
    started = time.perf_counter()
    for epoch in tqdm(range(max_epochs), desc="baseline training", disable=not progress):
        optimizer.train()
        for inputs, labels in train_batches(epoch):
            F.cross_entropy(logits_of(inputs), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        optimizer.eval()
        epochs_run = epoch + 1
        val_accuracy = _accuracy(logits_of, val_batches())
        if val_accuracy > best_accuracy:
            best_accuracy, best_epoch, bad_epochs = val_accuracy, epochs_run, 0
            best = [p.detach().clone() for p in params]
        else:
            bad_epochs += 1
        if bad_epochs >= patience:
            break
    with torch.no_grad():
        for param, value in zip(params, best, strict=True):
            param.copy_(value)
    return {
        "best_val_accuracy": best_accuracy,
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "train_seconds": time.perf_counter() - started,
    }
