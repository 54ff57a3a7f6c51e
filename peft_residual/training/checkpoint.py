"""Atomic, pickle-free training checkpoints: one safetensors file, scalars in its metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT_NAME = "residual_checkpoint.safetensors"


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write ``tensors`` and the JSON-able ``state`` to a temporary file, then rename it over the checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_NAME
    temporary = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    save_file(tensors, temporary, metadata={"state": json.dumps(state)})
    os.replace(temporary, final)
    return final


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The tensors and state of the checkpoint in ``directory``, or ``None`` if there is none."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        state = json.loads(handle.metadata()["state"])
    return tensors, state
