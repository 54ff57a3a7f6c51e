"""The ResiDual tuner, laid out like a PEFT tuner (``peft/tuners/<method>/``): it imports only torch, transformers
and peft, and registers the method "residual" with PEFT on import."""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from .architectures import ARCHITECTURES, Architecture, ArchitectureSpec, load_vision_model
from .config import PRESETS, ResiDualConfig
from .decomposition import UnitRecord, Units, decompose_units, recording
from .errors import ResiDualInputError
from .layer import ResiDualLayer, ResiDualReadoutLayer, ResiDualUnitLayer
from .model import ResiDualModel, residual_tuner
from .pca import FitReport, collect_units, fit_residual_bases
from .unit_store import UnitStore

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Architecture",
    "ArchitectureSpec",
    "FitReport",
    "ResiDualConfig",
    "ResiDualInputError",
    "ResiDualLayer",
    "ResiDualModel",
    "ResiDualReadoutLayer",
    "ResiDualUnitLayer",
    "UnitRecord",
    "UnitStore",
    "Units",
    "collect_units",
    "decompose_units",
    "fit_residual_bases",
    "load_vision_model",
    "recording",
    "residual_tuner",
]

if PeftType.RESIDUAL not in PEFT_TYPE_TO_TUNER_MAPPING:  # registered once per process, whatever is reloaded
    register_peft_method(name="residual", config_cls=ResiDualConfig, model_cls=ResiDualModel)
