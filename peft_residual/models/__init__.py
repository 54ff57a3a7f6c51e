"""Model support: which vision transformers ResiDual reads, and how (what PEFT keeps in ``utils/constants.py`` and
timm in its model registry).

- :mod:`.spec`: what a model class must say, :class:`ArchitectureSpec` (module paths) and :class:`Sizes`.
- :mod:`.registry`: :data:`ARCHITECTURES` and :data:`REFUSED`, filled by :func:`register_model` and
  :func:`refuse_model`; :func:`find_base_model` finds the supported model inside a wrapped one.
- :mod:`.architecture`: :class:`Architecture`, a spec bound to a model (sizes, unit names, signature, fingerprint,
  running its pieces), which the tuner reads.
- :mod:`.loading`: a supported model, its image preprocessing and tokenizer, from a name as its library spells it.
- One file per model family, each registering its classes: :mod:`.transformers` (CLIP, DINOv2, ViT, BLIP),
  :mod:`.open_clip`, :mod:`.timm`. Every module of this package is imported here, so a new family is one new file.

Example:
    >>> from peft_residual.models import ArchitectureSpec, register_model
    >>> @register_model("MyViTModel")  # its model_key: the class name for transformers, else "library.ClassName"
    ... def my_vit(model):
    ...     return ArchitectureSpec(vision_config=None, embedding="embeddings", attention_out=..., ...)
"""

from __future__ import annotations

import importlib
import pkgutil

from .architecture import Architecture, architecture_of, check_normalised, multihead_attention_heads
from .loading import image_preprocessor, load_tokenizer, load_vision_model, model_source
from .registry import ARCHITECTURES, REFUSED, find_base_model, model_key, refuse_model, register_model, spec_of
from .spec import ArchitectureSpec, Sizes, base_module


def register_families() -> None:
    """Import every module of this package (and of any folder added to its ``__path__``): each family file
    registers its classes as it is imported."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


register_families()

__all__ = [
    "ARCHITECTURES",
    "REFUSED",
    "Architecture",
    "ArchitectureSpec",
    "Sizes",
    "architecture_of",
    "base_module",
    "check_normalised",
    "find_base_model",
    "image_preprocessor",
    "load_tokenizer",
    "load_vision_model",
    "model_key",
    "model_source",
    "multihead_attention_heads",
    "refuse_model",
    "register_families",
    "register_model",
    "spec_of",
]
