"""The ResiDual tuner, laid out like a PEFT tuner (``peft/tuners/<method>/``): config, architecture map, unit
decomposition (with head coordinates and packed bases), layers, injection and the PCA fit. It imports only torch,
transformers and peft. Registration with PEFT happens in :mod:`peft_residual.compat`, on ``import peft_residual``."""

from .architectures import ARCHITECTURES, Architecture, ArchitectureSpec
from .config import PRESETS, ResiDualConfig
from .decomposition import UnitRecord, Units, decompose_units, recording
from .errors import ResiDualInputError
from .layer import ResiDualLayer, ResiDualReadoutLayer, ResiDualUnitLayer, readout
from .model import ResiDualModel, residual_tuner
from .pca import FitReport, RecordedBatch, fit_residual_bases

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Architecture",
    "ArchitectureSpec",
    "FitReport",
    "RecordedBatch",
    "ResiDualConfig",
    "ResiDualInputError",
    "ResiDualLayer",
    "ResiDualModel",
    "ResiDualReadoutLayer",
    "ResiDualUnitLayer",
    "UnitRecord",
    "Units",
    "decompose_units",
    "fit_residual_bases",
    "readout",
    "recording",
    "residual_tuner",
]
