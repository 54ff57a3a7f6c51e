"""Named setups. Hub ids serve users with network access; local paths (e.g. from shared/assets/prepare.sh) serve
offline machines. Both go through exactly the same code."""

from __future__ import annotations

import os

ASSETS = os.environ.get("RESIDUAL_ASSETS", os.path.expanduser("~/.cache/residual-assets"))

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
