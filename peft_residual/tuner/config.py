"""Configuration of the ResiDual PEFT method. It imports only peft, the standard library, torch and the package's two
leaf modules :mod:`~peft_residual.errors` and :mod:`~peft_residual.unit_names` (which import nothing from the
package): the allowed values of a field are read off its ``Literal`` annotation (:func:`choices`), and every field is
checked when the config is created (or loaded: PEFT creates it from the saved dict) and when a field is set.
``ResiDualInputError`` is re-exported here for the imports that found it in this module."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from peft.config import PeftConfig
from peft.utils import PeftType

from ..errors import ResiDualInputError
from ..unit_names import head_of

__all__ = ["PRESETS", "SEMANTIC_FIELDS", "ResiDualConfig", "ResiDualInputError", "choices"]


SEMANTIC_FIELDS = (
    "k", "units", "layers", "heads", "rest", "remainder", "lambda_init", "scale_per", "seed", "ln_mean", "centre",
)  # fmt: skip
"""Fields that change what a saved adapter computes: a saved config must hold every one of them."""


def _non_empty_list(value: Any, valid: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(valid(item) for item in value)


@dataclass
class ResiDualConfig(PeftConfig):
    """ResiDual: per-unit spectral rescaling of a ViT's residual units (arXiv 2411.00246), in readout form.

    Every selected unit ``u`` (an attention head or an MLP, as a direct contribution to the output) is replaced by
    ``Phi^T diag(lambda) Phi (u - mu)``, with ``Phi`` and ``mu`` the unit's PCA over reference images. Only ``lambda``
    is trained. ``ResiDualConfig(k=64)`` transforms every head with 64 components and adds the other units unchanged.

    Example:
        >>> from peft import get_peft_model
        >>> model = get_peft_model(clip_vision, ResiDualConfig(k=64))
        >>> star = ResiDualConfig.preset("residual*")  # the paper's ResiDual*
    """

    k: int | float | None = field(
        default=64,
        metadata={
            "help": "Principal components kept per unit: an int, a float in (0, 1) for the smallest number reaching "
            "that explained-variance ratio, or None for all (the unit's rank, at most samples - 1). Clamped to each "
            "unit's rank."
        },
    )
    units: Literal["heads", "mlps", "heads+mlps"] = field(
        default="heads", metadata={"help": "Which units are transformed: 'heads', 'mlps' or 'heads+mlps'."}
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Indices of the layers whose units are transformed; None means all."}
    )
    heads: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the heads to transform, e.g. ['layer11.head3', 'layer10.head0'] (as rank_heads returns "
            "them); None transforms every head of `layers`. The other heads are handled as `rest` says. Give "
            "`layers` or `heads`, not both."
        },
    )
    rest: Literal["sum", "zero", "mean"] = field(
        default="sum",
        metadata={
            "help": "What happens to units that are not transformed (the embedding, unselected heads/MLPs): 'sum' adds "
            "them unchanged, 'zero' drops them, 'mean' replaces them by their mean over the reference data."
        },
    )
    remainder: Literal["drop", "keep"] = field(
        default="drop",
        metadata={
            "help": "The part of a transformed unit outside its k components: 'drop' it (paper) or 'keep' it unscaled."
        },
    )
    lambda_init: Literal["ones", "randn", "eigen"] = field(
        default="randn",
        metadata={
            "help": "Initial scales: 'ones', 'randn' (1 + N(0, 1), as in the paper) or 'eigen' (each unit's PCA "
            "eigenvalues divided by their mean)."
        },
    )
    scale_per: Literal["component", "unit"] = field(
        default="component",
        metadata={
            "help": "'component': one scale per principal component (ResiDual); 'unit': one scale per unit shared by "
            "its components (the paper's coarse baseline)."
        },
    )
    ln_mean: Literal["shared", "unit"] = field(
        default="shared",
        metadata={
            "help": "How the final norm's centring is split among the units: 'shared' (the paper's code: the "
            "residual's mean is shared like the norm's bias, 1/(2L+1) per block, split among heads) or 'unit' (each "
            "unit centred on its own mean). Both sum exactly to the output; the units, their PCA and means differ."
        },
    )
    centre: bool = field(
        default=True,
        metadata={
            "help": "Subtract each unit's mean before the transform (ResiDual). False fits the PCA on the raw second "
            "moment and transforms the raw unit; with k=None and scale_per='unit' that is the paper's coarse "
            "baseline lambda_h * u_h."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'randn' initialisation, in [0, 2**63)."})
    basis_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32",
        metadata={
            "help": "Storage dtype of the PCA bases in the saved adapter: 'float32', or 'float16'/'bfloat16' for half "
            "the size. Bases are re-orthonormalised in float64 when rebuilt, and always applied in float32."
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Written by the tuner when the adapter is injected: the module paths of the architecture map. "
            "Choose what is transformed with `units`, `layers` and `heads`; setting this is an error."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules besides the ResiDual state that are trained and saved with the adapter, as in PEFT's "
            "other methods (e.g. ['classifier'] for a classification head): PEFT wraps each one and keeps a copy "
            "per adapter. They are trained by a loop that runs the model (e.g. transformers.Trainer), not on the "
            "unit cache of train_residual, which holds the frozen backbone's units."
        },
    )
    base_signature: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Filled in by fit_residual_bases: what the bases depend on (model type, sizes, the image size and "
            "token count they were fitted at, a short fingerprint of the base weights). Loading the adapter onto a "
            "base that differs is an error. Leave it as None."
        },
    )
    training_summary: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Filled in by train_residual (data sizes, best validation accuracy, epochs, lr); None."},
    )

    def __post_init__(self) -> None:
        rebuilt = self.peft_type is not None  # from a saved dict (to_dict holds peft_type); a user never passes it
        super().__post_init__()
        self.peft_type = PeftType.RESIDUAL
        if self.target_modules is not None and not rebuilt:
            raise ResiDualInputError(
                f"ResiDualConfig.target_modules is written by the tuner from the model's architecture map, got "
                f"{self.target_modules!r}; leave it unset and choose the transformed units with `units`, `layers` "
                "or `heads` (modules to train besides the scales go in `modules_to_save`)."
            )
        for name in _CHECKED:
            setattr(self, name, self._checked(name, getattr(self, name)))
        self.__dict__["_created"] = True  # from now on each field is checked as it is set

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse a bad value of a checked field when it is set, so that a config is valid wherever it is used."""
        if name in _CHECKED and self.__dict__.get("_created", False):
            value = self._checked(name, value)
        super().__setattr__(name, value)

    def _checked(self, name: str, value: Any) -> Any:
        """``value`` for field ``name``, normalised (``layers`` and ``heads`` sorted), or the error naming the fix."""
        if name == "k":
            if isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
                raise ResiDualInputError(f"ResiDualConfig.k must be an int, a float in (0, 1) or None, got {value!r}.")
            if isinstance(value, int) and value < 1:
                raise ResiDualInputError(f"ResiDualConfig.k must be at least 1 as an int, got {value}.")
            if isinstance(value, float) and not 0.0 < value < 1.0:
                raise ResiDualInputError(
                    f"ResiDualConfig.k as a float is an explained-variance ratio in (0, 1), got {value}; pass an int "
                    "for a fixed number of components."
                )
        elif name in _LITERALS:
            if value not in choices(name):
                raise ResiDualInputError(f"ResiDualConfig.{name} must be one of {choices(name)}, got {value!r}.")
        elif name == "layers" and value is not None:
            if not _non_empty_list(value, lambda i: isinstance(i, int) and not isinstance(i, bool)):
                raise ResiDualInputError(
                    f"ResiDualConfig.layers must be a non-empty list of ints or None, got {value!r}; "
                    "e.g. layers=[5] for one layer."
                )
            if self.__dict__.get("_created", False) and self.heads is not None:
                raise ResiDualInputError("Give ResiDualConfig.layers or ResiDualConfig.heads, not both.")
            value = sorted(set(value))
        elif name == "centre" and not isinstance(value, bool):
            raise ResiDualInputError(f"ResiDualConfig.centre must be True or False, got {value!r}.")
        elif name == "heads" and value is not None:
            if not _non_empty_list(value, lambda h: isinstance(h, str) and head_of(h)):
                raise ResiDualInputError(
                    f"ResiDualConfig.heads must be a non-empty list of names like 'layer11.head3', got {value!r}."
                )
            if self.layers is not None:
                raise ResiDualInputError("Give ResiDualConfig.layers or ResiDualConfig.heads, not both.")
            value = sorted(set(value), key=head_of)
        elif name == "seed" and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63):
            raise ResiDualInputError(f"ResiDualConfig.seed must be an int in [0, 2**63), got {value!r}.")
        return value

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ResiDualConfig:
        """A named setting of the paper: ``"residual"``, ``"residual*"`` or ``"coarse"`` (see :data:`PRESETS`).

        Example:
            >>> ResiDualConfig.preset("residual*", seed=1).k
            0.9
        """
        if name not in PRESETS:
            raise ResiDualInputError(f"No ResiDual preset {name!r}; the presets are {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def residual(cls, **overrides: Any) -> ResiDualConfig:
        """ResiDual: heads and MLPs transformed with all components, the embedding added back."""
        return cls.preset("residual", **overrides)

    @classmethod
    def residual_star(cls, **overrides: Any) -> ResiDualConfig:
        """ResiDual*: heads only, the fewest components reaching 90% explained variance, everything else dropped."""
        return cls.preset("residual*", **overrides)

    @classmethod
    def coarse(cls, **overrides: Any) -> ResiDualConfig:
        """The paper's coarse baseline: ``lambda_h * u_h`` on the raw heads (no mean removed), the rest dropped."""
        return cls.preset("coarse", **overrides)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        """Read a saved ``adapter_config.json``; malformed JSON or a missing field is an error naming the file."""
        loaded = super().from_json_file(path_json_file, **kwargs)  # a file that is not JSON: see compat
        missing = [name for name in SEMANTIC_FIELDS if name not in loaded]
        if missing:
            raise ResiDualInputError(
                f"{path_json_file} lacks the ResiDual field(s) {', '.join(missing)}; it was not written by "
                "save_pretrained of a ResiDual adapter, or was edited. Save the adapter again."
            )
        return loaded


PRESETS: dict[str, dict[str, Any]] = {
    "residual": {"k": None, "units": "heads+mlps", "rest": "sum"},
    "residual*": {"k": 0.9, "units": "heads", "rest": "zero"},
    "coarse": {"k": None, "units": "heads", "rest": "zero", "scale_per": "unit", "centre": False},
}
"""The paper's settings by name: ResiDual (heads and MLPs, all components, embedding added back), ResiDual* (heads,
90% explained variance, the rest dropped) and the coarse baseline (one scale per raw head, the rest dropped)."""


@functools.cache
def _hints() -> dict[str, Any]:
    return get_type_hints(ResiDualConfig)


def choices(name: str) -> tuple[Any, ...]:
    """The values field ``name`` of :class:`ResiDualConfig` allows: the arguments of its ``Literal`` annotation.

    Example:
        >>> choices("units")
        ('heads', 'mlps', 'heads+mlps')
    """
    return get_args(_hints()[name])


_LITERALS = tuple(name for name in ResiDualConfig.__annotations__ if get_origin(_hints()[name]) is Literal)
"""The fields whose allowed values are a ``Literal`` annotation, in their order."""
_CHECKED = ("k", *_LITERALS, "layers", "centre", "heads", "seed")
"""The fields checked at creation, in this order, and whenever one is set."""
