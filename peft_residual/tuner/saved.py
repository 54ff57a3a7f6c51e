"""What a saved ResiDual adapter directory must look like before it is loaded.

:func:`peft_residual.hub.save_adapter_atomically` stages a save inside the target directory and marks the few
moments in which it moves the staged files into place with :data:`SAVE_IN_PROGRESS`; a process killed then leaves
the marker, and :func:`check_saved_adapter` (run before ``ResiDualConfig.from_pretrained`` reads a local
directory, see :mod:`peft_residual.compat`) refuses the directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

from .config import ResiDualInputError

SAVE_IN_PROGRESS = ".residual-save-in-progress"
"""Present in an adapter directory only while a save replaces its files."""
STAGING_PREFIX = ".residual-staging."
"""Directories inside an adapter directory that hold a save being written; leftovers of a killed save."""


def check_saved_adapter(directory: str | Path) -> None:
    """Refuse a local adapter directory that a killed save left half replaced, that lacks its weights file, or
    whose weights hold NaN or infinity; a clear error names the directory or file and the fix.

    Example:
        >>> check_saved_adapter("out/adapter")  # before PeftModel.from_pretrained(base, "out/adapter")
    """
    directory = Path(directory)
    # a named adapter sits in a subfolder of the directory that was saved to, where the marker is
    if (directory / SAVE_IN_PROGRESS).exists() or (directory.parent / SAVE_IN_PROGRESS).exists():
        raise ResiDualInputError(
            f"{directory} holds an interrupted save: the process saving an adapter there was killed while it "
            "replaced the files, so they may come from two saves. Save the adapter there again."
        )
    weights = directory / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        raise ResiDualInputError(
            f"{directory} has an adapter config but no {SAFETENSORS_WEIGHTS_NAME}; copy the whole adapter "
            "directory, or save the adapter there again."
        )
    try:
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ResiDualInputError(
                        f"{weights} is damaged: tensor {key} holds NaN or infinity. Restore the file or save the "
                        "adapter again."
                    )
    except SafetensorError as error:  # truncated or overwritten: safetensors' own message names no file
        raise ResiDualInputError(
            f"{weights} is not a readable safetensors file ({error}); it was truncated or damaged in a copy. Restore "
            "the file or save the adapter again."
        ) from None
