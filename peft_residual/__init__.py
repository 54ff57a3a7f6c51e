"""ResiDual (arXiv 2411.00246) as a PEFT method. Importing this package registers the method "residual" with PEFT.

The tuner itself (config, architecture map, unit decomposition, PCA fit, layers, injection) is
:mod:`peft_residual.tuner`; training, caching, classifiers, data, Hub and CLI sit on top of it.

Example:
    >>> import peft_residual
    >>> from peft import get_peft_model
    >>> model = get_peft_model(clip_vision, peft_residual.ResiDualConfig(k=64))
    >>> peft_residual.fit_residual_bases(model, loader)
"""

from . import compat

compat.install()

from .cache import StreamedUnits, UnitCache, encode_dataset  # noqa: E402
from .classifiers import (  # noqa: E402
    CentroidClassifier,
    Classifier,
    ZeroShotClassifier,
    default_classifier,
    load_templates,
)
from .data import holdout, stratified_split  # noqa: E402
from .hub import model_card, push_adapter_to_hub  # noqa: E402
from .inference import accuracy, embed_batches, embed_images  # noqa: E402
from .lr_finder import find_learning_rate  # noqa: E402
from .scales import ScaleSet  # noqa: E402
from .steps import epoch_seed  # noqa: E402
from .trainer import TrainingResult, default_accelerator, train_residual  # noqa: E402
from .tuner import (  # noqa: E402
    ARCHITECTURES,
    PRESETS,
    Architecture,
    ArchitectureSpec,
    FitReport,
    ResiDualConfig,
    ResiDualInputError,
    ResiDualModel,
    ResiDualReadoutLayer,
    ResiDualUnitLayer,
    Units,
    decompose_units,
    fit_residual_bases,
    load_vision_model,
)

RESIDUAL_PEFT_TYPE = compat.RESIDUAL_PEFT_TYPE

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "RESIDUAL_PEFT_TYPE",
    "Architecture",
    "ArchitectureSpec",
    "CentroidClassifier",
    "Classifier",
    "FitReport",
    "ResiDualConfig",
    "ResiDualInputError",
    "ResiDualModel",
    "ResiDualReadoutLayer",
    "ResiDualUnitLayer",
    "ScaleSet",
    "StreamedUnits",
    "TrainingResult",
    "UnitCache",
    "Units",
    "ZeroShotClassifier",
    "accuracy",
    "decompose_units",
    "default_accelerator",
    "default_classifier",
    "embed_batches",
    "embed_images",
    "encode_dataset",
    "epoch_seed",
    "find_learning_rate",
    "fit_residual_bases",
    "holdout",
    "load_templates",
    "load_vision_model",
    "model_card",
    "push_adapter_to_hub",
    "stratified_split",
    "train_residual",
]
