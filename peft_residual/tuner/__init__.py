"""The ResiDual tuner, laid out like a PEFT tuner (``peft/tuners/<method>/``): config, unit decomposition (with head
coordinates), layers, injection, and the PCA fit. Its intake, units recorded from images, is
:mod:`peft_residual.recording`. Which models it reads, and how, is model support (:mod:`peft_residual.models`), as
PEFT's tuners take their target maps from ``utils/constants.py``. Registration with PEFT happens in
:mod:`peft_residual.compat`, on ``import peft_residual``."""

from .config import PRESETS, ResiDualConfig, ResiDualInputError
from .layer import ResiDualLayer, ResiDualReadoutLayer, ResiDualUnitLayer, active_adapter
from .model import ResiDualModel, residual_tuner
from .pca import FitReport, ResiDualBases, apply_residual_bases, get_residual_bases
from .plan import Components, readout

__all__ = [
    "PRESETS",
    "Components",
    "FitReport",
    "ResiDualBases",
    "ResiDualConfig",
    "ResiDualInputError",
    "ResiDualLayer",
    "ResiDualModel",
    "ResiDualReadoutLayer",
    "ResiDualUnitLayer",
    "active_adapter",
    "apply_residual_bases",
    "get_residual_bases",
    "readout",
    "residual_tuner",
]
