"""Named setups. Hub ids serve users with network access; local paths (e.g. from shared/assets/prepare.sh) serve
offline machines. Both go through exactly the same code."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from typing import Any

ASSETS = os.environ.get("RESIDUAL_ASSETS", os.path.expanduser("~/.cache/residual-assets"))


def portable(value: Any) -> Any:
    """``value`` (a string, or a list or dict of them) with the asset directory written as ``$RESIDUAL_ASSETS``:
    a committed record names no developer's own path."""
    if isinstance(value, str):
        for root in sorted({ASSETS, os.path.realpath(ASSETS)}, key=len, reverse=True):
            value = value.replace(root, "$RESIDUAL_ASSETS")
        return value
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item) for item in value]
    return value


def recorded_command(module: str, argv: Sequence[str]) -> str:
    """The command line a record was made with, as ``python -m MODULE ARGS``, portable (see :func:`portable`)."""
    return portable(f"python -m {module} {shlex.join(str(arg) for arg in argv)}".rstrip())


PRESETS: dict[str, dict] = {
    # offline, real weights: DINOv2-S/14 with a centroid classifier
    "dinov2-mnist": {
        "model": f"{ASSETS}/models/dinov2-small-imgfocus",
        "dataset": f"{ASSETS}/datasets/mnist",
        "image_size": 98,
    },
    "dinov2-fashion-mnist": {
        "model": f"{ASSETS}/models/dinov2-small-imgfocus",
        "dataset": f"{ASSETS}/datasets/fashion-mnist",
        "image_size": 98,
    },
    # with the Hub: CLIP zero-shot text classifiers, OpenAI template ensembles
    "clip-b32-cifar10": {
        "model": "openai/clip-vit-base-patch32",
        "dataset": "uoft-cs/cifar10",
        "image_column": "img",
        "templates": "cifar10",
    },
    "clip-b16-cifar10": {
        "model": "openai/clip-vit-base-patch16",
        "dataset": "uoft-cs/cifar10",
        "image_column": "img",
        "templates": "cifar10",
    },
    "clip-b32-eurosat": {
        "model": "openai/clip-vit-base-patch32",
        "dataset": "blanchon/EuroSAT_RGB",
        "test_split": "test",
        "templates": "eurosat",
    },
    "clip-b32-mnist": {
        "model": "openai/clip-vit-base-patch32",
        "dataset": "ylecun/mnist",
        "templates": "mnist",
    },
    "clip-b32-dtd": {
        "model": "openai/clip-vit-base-patch32",
        "dataset": "tanganke/dtd",
        "templates": "dtd",
    },
}
