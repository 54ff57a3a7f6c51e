"""ResiDual (arXiv 2411.00246) as a PEFT method. Importing this package registers the method "residual" with PEFT.

The tuner itself (config, architecture map, unit decomposition, PCA fit, layers, injection) is
:mod:`peft_residual.tuner`; training, caching, classifiers, data, Hub and CLI sit on top of it.

Example:
    >>> import peft_residual
    >>> from peft import get_peft_model
    >>> model = get_peft_model(clip_vision, peft_residual.ResiDualConfig(k=64))
    >>> peft_residual.fit_residual_bases(model, loader)

Importing PEFT takes seconds, so this module imports it only when needed: at once if PEFT is already loaded,
otherwise right after the first ``import peft`` (a one-shot import hook), and names below load on first use. Either
way, the method is registered before any PEFT code can look it up.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_EXPORTS = {
    "cache": ["StreamedUnits", "UnitCache", "adapted_embeddings", "base_embeddings", "encode_dataset"],
    "classifiers": ["CentroidClassifier", "Classifier", "ZeroShotClassifier", "default_classifier", "load_templates"],
    "compat": ["RESIDUAL_PEFT_TYPE"],
    "data": ["holdout", "stratified_split"],
    "hub": ["model_card", "push_adapter_to_hub"],
    "inference": ["accuracy", "embed_batches", "embed_images"],
    "lr_finder": ["find_learning_rate"],
    "ranking": ["HeadRanking", "ablated_output", "ablation_accuracy", "rank_heads", "ranking_curves"],
    "scales": ["ScaleSet"],
    "steps": ["epoch_seed"],
    "trainer": ["TrainingResult", "default_accelerator", "train_residual"],
    "tuner": [
        "ARCHITECTURES", "PRESETS", "Architecture", "ArchitectureSpec", "FitReport", "ResiDualConfig",
        "ResiDualInputError", "ResiDualModel", "ResiDualReadoutLayer", "ResiDualUnitLayer", "UnitStore", "Units",
        "collect_units", "decompose_units", "fit_residual_bases", "load_vision_model",
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


def _register() -> None:
    from . import compat

    compat.install()  # first: the tuner's registration needs PeftType.RESIDUAL
    from . import tuner  # noqa: F401  (importing the tuner registers "residual" with PEFT)


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` as soon as ``peft`` has finished importing, then removes itself."""

    def find_spec(self, name: str, path=None, target=None):
        if name != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module) -> None:
                exec_module(module)
                _register()

            spec.loader.exec_module = exec_then_register
        return spec


if "peft" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterAfterPeft) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterPeft())
