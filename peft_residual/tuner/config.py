"""Configuration of the ResiDual PEFT method."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, PeftType

from .decomposition import LN_MEANS
from .errors import ResiDualInputError
from .saved import check_saved_adapter

UNIT_KINDS = ("heads", "mlps", "heads+mlps")
REST_MODES = ("sum", "zero", "mean")
LAMBDA_INITS = ("ones", "randn", "eigen")
REMAINDER_MODES = ("drop", "keep")
SCALE_PER = ("component", "unit")
BASIS_DTYPES = ("float32", "float16", "bfloat16")
SEMANTIC_FIELDS = (
    "k", "units", "layers", "heads", "rest", "remainder", "lambda_init", "scale_per", "seed", "ln_mean", "centre",
)  # fmt: skip
HEAD_NAME = re.compile(r"layer(\d+)\.head(\d+)")
"""Fields that change what a saved adapter computes: a saved config must hold every one of them."""


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
        self.validate()

    def validate(self) -> None:
        """Check every field; called at construction and again wherever the config is used, so that fields
        changed after construction are checked too."""
        k = self.k
        if isinstance(k, bool) or not (k is None or isinstance(k, (int, float))):
            raise ResiDualInputError(f"ResiDualConfig.k must be an int, a float in (0, 1) or None, got {k!r}.")
        if isinstance(k, int) and k < 1:
            raise ResiDualInputError(f"ResiDualConfig.k must be at least 1 as an int, got {k}.")
        if isinstance(k, float) and not 0.0 < k < 1.0:
            raise ResiDualInputError(
                f"ResiDualConfig.k as a float is an explained-variance ratio in (0, 1), got {k}; pass an int for a "
                "fixed number of components."
            )
        for name, allowed in (
            ("units", UNIT_KINDS),
            ("rest", REST_MODES),
            ("remainder", REMAINDER_MODES),
            ("lambda_init", LAMBDA_INITS),
            ("scale_per", SCALE_PER),
            ("basis_dtype", BASIS_DTYPES),
            ("ln_mean", LN_MEANS),
        ):
            if getattr(self, name) not in allowed:
                raise ResiDualInputError(
                    f"ResiDualConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}."
                )
        layers = self.layers
        if layers is not None:
            if (
                not isinstance(layers, (list, tuple))
                or not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            ):
                raise ResiDualInputError(
                    f"ResiDualConfig.layers must be a non-empty list of ints or None, got {layers!r}; "
                    "e.g. layers=[5] for one layer."
                )
            self.layers = sorted(set(layers))
        if not isinstance(self.centre, bool):
            raise ResiDualInputError(f"ResiDualConfig.centre must be True or False, got {self.centre!r}.")
        heads = self.heads
        if heads is not None:
            if (
                not isinstance(heads, (list, tuple))
                or not heads
                or not all(isinstance(h, str) and HEAD_NAME.fullmatch(h) for h in heads)
            ):
                raise ResiDualInputError(
                    f"ResiDualConfig.heads must be a non-empty list of names like 'layer11.head3', got {heads!r}."
                )
            if layers is not None:
                raise ResiDualInputError("Give ResiDualConfig.layers or ResiDualConfig.heads, not both.")
            self.heads = sorted(set(heads), key=lambda h: tuple(map(int, HEAD_NAME.fullmatch(h).groups())))
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ResiDualInputError(f"ResiDualConfig.seed must be an int in [0, 2**63), got {seed!r}.")

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
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's loading, after :func:`.saved.check_saved_adapter` on a local directory (an interrupted save, a
        missing weights file or non-finite weights are refused there, naming the file)."""
        directory = Path(pretrained_model_name_or_path, subfolder or "")
        if (directory / CONFIG_NAME).is_file():
            check_saved_adapter(directory)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

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
