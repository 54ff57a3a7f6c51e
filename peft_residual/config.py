"""Configuration of the ResiDual PEFT method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .registration import RESIDUAL_PEFT_TYPE

UNIT_KINDS = ("heads", "heads+mlps")
REST_MODES = ("sum", "zero", "mean")
LAMBDA_INITS = ("ones", "randn", "eigen")
REMAINDER_MODES = ("drop", "keep")
SCALE_PER = ("component", "unit")


@dataclass
class ResiDualConfig(PeftConfig):
    """ResiDual: per-unit spectral rescaling of a ViT's residual units (arXiv 2411.00246), in readout form.

    Every selected unit ``u`` (an attention head or an MLP, as a direct contribution to the output) is replaced by
    ``Phi^T diag(lambda) Phi (u - mu)``, with ``Phi`` and ``mu`` the unit's PCA over reference images. Only ``lambda``
    is trained. ``ResiDualConfig(k=64)`` transforms every head with 64 components and adds the other units unchanged.

    Example:
        >>> from peft import get_peft_model
        >>> model = get_peft_model(clip_vision, ResiDualConfig(k=64))
        >>> star = ResiDualConfig.residual_star()  # the paper's ResiDual*
    """

    k: int | float | None = field(
        default=64,
        metadata={
            "help": "Principal components kept per unit: an int, a float in (0, 1) for the smallest number reaching "
            "that explained-variance ratio, or None for all (the unit's rank, at most samples - 1). Clamped to each "
            "unit's rank."
        },
    )
    units: Literal["heads", "heads+mlps"] = field(
        default="heads", metadata={"help": "Which units are transformed: 'heads' or 'heads+mlps'."}
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Indices of the layers whose units are transformed; None means all."}
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
    seed: int = field(default=0, metadata={"help": "Seed of the 'randn' initialisation."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Filled in from the architecture map when the adapter is injected; leave it as None."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = RESIDUAL_PEFT_TYPE
        self._validate()

    def _validate(self) -> None:
        k = self.k
        if isinstance(k, bool) or not (k is None or isinstance(k, (int, float))):
            raise ValueError(f"ResiDualConfig.k must be an int, a float in (0, 1) or None, got {k!r}.")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"ResiDualConfig.k must be at least 1 as an int, got {k}.")
        if isinstance(k, float) and not 0.0 < k < 1.0:
            raise ValueError(
                f"ResiDualConfig.k as a float is an explained-variance ratio in (0, 1), got {k}; pass an int for a "
                "fixed number of components."
            )
        for name, allowed in (
            ("units", UNIT_KINDS),
            ("rest", REST_MODES),
            ("remainder", REMAINDER_MODES),
            ("lambda_init", LAMBDA_INITS),
            ("scale_per", SCALE_PER),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ResiDualConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.layers is not None:
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(
                    f"ResiDualConfig.layers must be a non-empty list of ints or None, got {self.layers!r}."
                )
            self.layers = sorted(set(self.layers))
        if not isinstance(self.seed, int):
            raise ValueError(f"ResiDualConfig.seed must be an int, got {self.seed!r}.")

    @classmethod
    def residual(cls, **overrides) -> ResiDualConfig:
        """ResiDual: heads and MLPs transformed with all components, the embedding added back."""
        return cls(**{"k": None, "units": "heads+mlps", "rest": "sum", **overrides})

    @classmethod
    def coarse(cls, **overrides) -> ResiDualConfig:
        """Coarse baseline: one scale per head, on all its components; the other units added back."""
        return cls(**{"k": None, "units": "heads", "rest": "sum", "scale_per": "unit", **overrides})

    @classmethod
    def residual_star(cls, **overrides) -> ResiDualConfig:
        """ResiDual*: heads only, the fewest components reaching 90% explained variance, everything else dropped."""
        return cls(**{"k": 0.9, "units": "heads", "rest": "zero", **overrides})
