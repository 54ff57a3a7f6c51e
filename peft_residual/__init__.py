"""ResiDual (arXiv 2411.00246) as a PEFT method. Importing this package registers the method "residual" with PEFT.

Example:
    >>> import peft_residual
    >>> from peft import get_peft_model
    >>> model = get_peft_model(clip_vision, peft_residual.ResiDualConfig(k=64))
    >>> peft_residual.fit_residual_bases(model, loader)
"""

from .architectures import ARCHITECTURES, Architecture, ArchitectureSpec
from .config import ResiDualConfig
from .decomposition import Units, decompose_units
from .layer import ResiDualReadoutLayer, ResiDualUnitLayer
from .model import ResiDualModel
from .pca import FitReport, fit_residual_bases
from .registration import RESIDUAL_PEFT_TYPE, register

register(ResiDualConfig, ResiDualModel)

__all__ = [
    "ARCHITECTURES",
    "RESIDUAL_PEFT_TYPE",
    "Architecture",
    "ArchitectureSpec",
    "FitReport",
    "ResiDualConfig",
    "ResiDualModel",
    "ResiDualReadoutLayer",
    "ResiDualUnitLayer",
    "Units",
    "decompose_units",
    "fit_residual_bases",
]
