"""ResiDual (arXiv 2411.00246) as a PEFT method. Importing this package registers the method "residual" with PEFT.

The tuner itself (config, unit decomposition, PCA fit, layers, injection) is :mod:`peft_residual.tuner`; the models
it reads are a registry, :mod:`peft_residual.models` (one file per family, and loading by name). Data intake
(:mod:`.data`), training (:mod:`.training`), classifiers, analyses, Hub and CLI sit on top of them. Names below load
on first use.

Example:
    >>> import peft_residual
    >>> from peft import get_peft_model
    >>> model = get_peft_model(clip_vision, peft_residual.ResiDualConfig(k=64))
    >>> peft_residual.fit_residual_bases(model, loader)
"""

from __future__ import annotations

import importlib

from . import compat

compat.install()  # PeftType.RESIDUAL, the tuner's registration, and ResiDual's saving and card

_EXPORTS = {
    "analysis.ranking": ["HeadRanking", "ablated_output", "ablation_accuracy", "rank_heads", "ranking_curves"],
    "classifiers": [
        "CentroidClassifier", "Classifier", "LinearClassifier", "ZeroShotClassifier", "default_classifier",
        "load_templates",
    ],
    "compat": ["RESIDUAL_PEFT_TYPE"],
    "data": ["UnitStore", "base_embeddings", "collect_units", "fit_residual_bases", "holdout", "stratified_split"],
    "hub": ["model_card", "push_adapter_to_hub"],
    "inference": ["accuracy", "embed_all_adapters", "embed_batches", "embed_batches_of_adapters", "embed_images"],
    "recording": ["Units", "decompose_units"],
    "models": ["ARCHITECTURES", "Architecture", "ArchitectureSpec", "load_vision_model", "register_model"],
    "training.cache": ["StreamedUnits", "UnitCache", "adapted_embeddings", "encode_dataset"],
    "training.lr_finder": ["find_learning_rate"],
    "training.scales": ["ScaleSet"],
    "training.steps": ["epoch_seed"],
    "training.trainer": ["TrainingResult", "default_accelerator", "train_residual"],
    "tuner": [
        "PRESETS", "FitReport", "ResiDualConfig", "ResiDualInputError", "ResiDualModel", "ResiDualReadoutLayer",
        "ResiDualUnitLayer", "readout",
    ],
}  # fmt: skip
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
