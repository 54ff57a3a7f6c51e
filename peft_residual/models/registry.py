"""The registry of supported model classes, filled by the family files of :mod:`peft_residual.models` as they are
imported (as timm's ``register_model`` fills its own).

Every entry of :data:`ARCHITECTURES` is one kind of thing: a function giving a model's :class:`.ArchitectureSpec`
(a fixed spec, or one read off the model's variant), which may also refuse the model with the reason.
:data:`REFUSED` names the classes that cannot be decomposed at all, and why.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ResiDualInputError
from .spec import ArchitectureSpec

SpecOf = Callable[[nn.Module], ArchitectureSpec]
"""A registry entry: the spec of a model of the registered classes (raising :class:`ResiDualInputError` for a
variant it cannot decompose)."""

ARCHITECTURES: dict[str, SpecOf] = {}
"""Supported model classes, by :func:`model_key`: the function giving a model's spec (or refusing it)."""

REFUSED: dict[str, str] = {}
"""Model classes ResiDual cannot decompose, with the reason given to the user."""


def _claim(keys: tuple[str, ...]) -> None:
    taken = [key for key in keys if key in ARCHITECTURES or key in REFUSED]
    if not keys or taken:
        raise ValueError(f"register a model class once, by its model_key; already registered: {taken or 'no key'}")


def register_model(*keys: str) -> Callable[[SpecOf], SpecOf]:
    """Decorator: the function gives the spec of models of the classes ``keys`` (their :func:`model_key`).

    Example:
        >>> @register_model("MyViTModel")
        ... def my_vit(model):
        ...     return ArchitectureSpec(vision_config=None, embedding="embeddings", ...)
    """
    _claim(keys)

    def register(spec_of: SpecOf) -> SpecOf:
        ARCHITECTURES.update(dict.fromkeys(keys, spec_of))
        return spec_of

    return register


def refuse_model(*keys: str, reason: str) -> None:
    """Record that models of the classes ``keys`` cannot be decomposed, with the ``reason`` the user is given."""
    _claim(keys)
    REFUSED.update(dict.fromkeys(keys, reason))


def model_key(module: nn.Module) -> str:
    """How :data:`ARCHITECTURES` names a model class: a transformers class by its name, another library's as
    ``"library.ClassName"`` (open_clip and timm both have a ``VisionTransformer``)."""
    library = type(module).__module__.split(".")[0]
    return type(module).__name__ if library == "transformers" else f"{library}.{type(module).__name__}"


def find_base_model(model: nn.Module) -> nn.Module:
    """The supported model inside ``model``, which may be wrapped by a ``PeftModel`` and a ``BaseTuner``."""
    for candidate in model.modules():
        key = model_key(candidate)
        if key in ARCHITECTURES:
            return candidate
        if key in REFUSED:
            raise ResiDualInputError(f"ResiDual cannot adapt {type(candidate).__name__}. {REFUSED[key]}")
    raise ResiDualInputError(
        f"ResiDual does not support {type(model).__name__}. Supported model classes: "
        f"{', '.join(sorted(ARCHITECTURES))}. For another pre-LN vision transformer, register its ArchitectureSpec "
        "with @peft_residual.models.register_model in a new file of peft_residual/models/."
    )


def spec_of(model: nn.Module) -> ArchitectureSpec:
    """The spec of ``model``, a supported model (see :func:`find_base_model`)."""
    return ARCHITECTURES[model_key(model)](model)
