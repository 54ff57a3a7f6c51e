"""The vocabulary of a model family: what one model class must say for its residual units to be found
(:class:`ArchitectureSpec`, :class:`Sizes`), and the helpers a family's spec uses to read a model through any PEFT
wrapper or to refuse it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import ResiDualInputError


class Sizes(NamedTuple):
    """The sizes that fix a vision transformer's units."""

    num_layers: int
    num_heads: int
    hidden_size: int
    head_dim: int
    patch_size: int


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one model class. ``{i}`` is replaced by the layer index."""

    vision_config: str | None
    """Attribute of ``model.config`` holding the vision config, or ``None`` if ``model.config`` is it."""
    embedding: str
    """Module whose output (at CLS) is the embedding unit as it enters the first block."""
    attention_out: str
    """Attention output projection; its input is the concatenation of the heads' outputs. With
    ``multihead_attention``, the ``nn.MultiheadAttention`` module itself (see
    :func:`.architecture.multihead_attention_heads`)."""
    mlp_out: str
    """Module whose output (at CLS) is a layer's whole MLP contribution, layer scale included."""
    final_norm: str
    """The LayerNorm that produces the pooled output."""
    mlp: str | None = None
    """Module running a layer's MLP on the normed stream, if it is not ``mlp_out`` itself (recording passes feed the
    last layer's MLP the CLS token alone)."""
    attention_layer_scale: str | None = None
    """Parameter scaling the attention output before the residual add, if any (e.g. DINOv2's ``lambda1``)."""
    projection: str | None = None
    """Linear map from the pooled output to the embedding space, if any: a module, or with ``projection_matrix`` a
    bare ``[in, out]`` parameter applied as ``pooled @ P``."""
    tower: str | None = None
    """Submodule that runs the vision backbone on ``pixel_values``, or ``None`` if the model itself does."""
    pooled: str = "pooler_output"
    """Where the model's output gives the decomposed embedding: ``"pooler_output"``, or ``"cls"`` for
    ``last_hidden_state[:, 0]`` when the model's pooler is a further non-linear layer (ViT's tanh pooler)."""
    sizes: Callable[[nn.Module], Sizes] | None = None
    """Reads the sizes off a model with no transformers config (open_clip, timm); ``None``: from the config."""
    multihead_attention: bool = False
    """``attention_out`` is an ``nn.MultiheadAttention``, which never calls its ``out_proj`` as a module."""
    projection_matrix: bool = False
    """``projection`` is a parameter that the tower's forward applies after pooling (open_clip's ``proj``): the
    readout then replaces the tower's output."""
    keyword_input: bool = True
    """Whether the tower takes ``pixel_values=`` (transformers) or the images as its first argument."""
    classifier: str | None = None
    """The classification head of a ``*ForImageClassification`` model, which reads the decomposed embedding (so
    ResiDual adapts its input), or ``None``. The model's output is then the head's logits, and the embedding is
    read off ``tower``."""
    classifier_input: str = "cls"
    """What ``classifier`` reads: ``"cls"`` (the decomposed embedding, ViT), or ``"cls+patch_mean"`` (DINOv2:
    ``[CLS, mean of the patch tokens]`` of the normed sequence, whose CLS half is adapted and whose patch mean stays
    the base model's)."""

    def under(self, prefix: str, **changes: Any) -> ArchitectureSpec:
        """This spec for the same tower inside a larger model, at submodule ``prefix``, with ``changes``."""
        names = ("embedding", "attention_out", "attention_layer_scale", "mlp_out", "mlp", "final_norm")
        paths = {name: f"{prefix}.{getattr(self, name)}" for name in names if getattr(self, name) is not None}
        return ArchitectureSpec(**{**self.__dict__, **paths, **changes})


def base_module(module: nn.Module) -> nn.Module:
    """``module`` itself, or the module a PEFT layer wraps (specs and sizes are also read off adapted models)."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def refusal(model: nn.Module, reason: str) -> ResiDualInputError:
    """The error a spec raises for a variant of a supported class that ResiDual cannot decompose."""
    return ResiDualInputError(f"ResiDual cannot adapt this {type(model).__name__}: {reason}")


def check_layer_norm(model: nn.Module, norm: nn.Module, name: str) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise refusal(
            model,
            f"its {name} is {type(norm).__name__}, not a LayerNorm; the decomposition linearises a LayerNorm with "
            "each sample's own mean and variance.",
        )


def square_patch(model: nn.Module, patch_size: tuple[int, int] | int) -> int:
    height, width = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if height != width:
        raise refusal(model, f"its patches are {height}x{width} px; only square patches are supported.")
    return int(height)
