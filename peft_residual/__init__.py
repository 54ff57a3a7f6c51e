"""ResiDual (arXiv 2411.00246) as a PEFT method. Importing this package registers the method "residual" with PEFT.

Example:
    >>> import peft_residual
    >>> from peft import get_peft_model
    >>> model = get_peft_model(clip_vision, peft_residual.ResiDualConfig(k=64))
    >>> peft_residual.fit_residual_bases(model, loader)
"""

from .architectures import ARCHITECTURES, Architecture, ArchitectureSpec
from .cache import UnitCache, encode_dataset
from .classifiers import CentroidClassifier, Classifier, ZeroShotClassifier, load_templates
from .config import ResiDualConfig
from .decomposition import Units, decompose_units, embed_batches, embed_images
from .hub import install_push_to_hub, model_card, push_adapter_to_hub
from .layer import ResiDualReadoutLayer, ResiDualUnitLayer
from .model import ResiDualModel
from .pca import FitReport, fit_residual_bases
from .registration import RESIDUAL_PEFT_TYPE, register
from .trainer import TrainingResult, accuracy, find_learning_rate, stratified_split, train_residual

register(ResiDualConfig, ResiDualModel)
install_push_to_hub()

__all__ = [
    "ARCHITECTURES",
    "RESIDUAL_PEFT_TYPE",
    "Architecture",
    "ArchitectureSpec",
    "CentroidClassifier",
    "Classifier",
    "FitReport",
    "ResiDualConfig",
    "ResiDualModel",
    "ResiDualReadoutLayer",
    "ResiDualUnitLayer",
    "TrainingResult",
    "UnitCache",
    "Units",
    "ZeroShotClassifier",
    "accuracy",
    "decompose_units",
    "embed_batches",
    "embed_images",
    "encode_dataset",
    "find_learning_rate",
    "fit_residual_bases",
    "load_templates",
    "model_card",
    "push_adapter_to_hub",
    "stratified_split",
    "train_residual",
]
