"""Vision transformers from open_clip and timm: their architecture specs, the variants refused, and the heads of
``nn.MultiheadAttention``.

Neither library has a transformers config, so each spec reads the sizes off the modules, and is built per model:
layer scales, a classifier head and the final norm's place differ between variants of one class.

- **open_clip** (``open_clip.CLIP`` and its ``VisionTransformer``): ``ln_pre`` gives the embedding unit, each
  ``ResidualAttentionBlock`` an ``nn.MultiheadAttention`` (packed ``in_proj``) and an MLP behind ``ls_2``, then
  ``ln_post`` and the bare ``proj`` matrix. ``nn.MultiheadAttention`` computes its output projection inside one fused
  function, never calling ``out_proj`` as a module, so the adapted model runs the same attention in separate steps
  (:func:`multihead_attention_heads`), which exposes the concatenated heads.
- **timm** (``timm.models.VisionTransformer`` with class-token pooling): ``norm_pre`` gives the embedding unit, each
  ``Block`` ``attn.proj`` and an MLP behind ``ls2``, then ``norm`` (or ``fc_norm``) and any linear ``head``.

These libraries are imported by the models a user passes in; this module never imports them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .errors import ResiDualInputError
from .spec import ArchitectureSpec, Sizes


def base_module(module: nn.Module) -> nn.Module:
    """``module`` itself, or the module a PEFT layer wraps (specs and sizes are also read off adapted models)."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _refuse(model: nn.Module, reason: str) -> ResiDualInputError:
    return ResiDualInputError(f"ResiDual cannot adapt this {type(model).__name__}: {reason}")


def _check_layer_norm(model: nn.Module, norm: nn.Module, name: str) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise _refuse(
            model,
            f"its {name} is {type(norm).__name__}, not a LayerNorm; the decomposition linearises a LayerNorm with "
            "each sample's own mean and variance.",
        )


def _square_patch(model: nn.Module, patch_size: tuple[int, int] | int) -> int:
    height, width = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if height != width:
        raise _refuse(model, f"its patches are {height}x{width} px; only square patches are supported.")
    return int(height)


# ---------------------------------------------------------------------------------------------------------- open_clip


def _open_clip_tower(model: nn.Module) -> nn.Module:
    return model.visual if hasattr(model, "visual") else model


def _open_clip_sizes(model: nn.Module) -> Sizes:
    tower = _open_clip_tower(model)
    attention = base_module(tower.transformer.resblocks[0].attn)
    return Sizes(
        num_layers=len(tower.transformer.resblocks),
        num_heads=attention.num_heads,
        hidden_size=attention.embed_dim,
        head_dim=attention.head_dim,
        patch_size=_square_patch(model, tower.patch_size),
    )


def open_clip_spec(model: nn.Module) -> ArchitectureSpec:
    """The spec of an ``open_clip`` CLIP model (or of its ``VisionTransformer``), or why it is refused."""
    tower = _open_clip_tower(model)
    if type(tower).__name__ != "VisionTransformer":
        raise _refuse(model, f"its vision tower is {type(tower).__name__}; ResiDual reads open_clip ViTs only.")
    if getattr(tower, "attn_pool", None) is not None:
        raise _refuse(
            model,
            "its pooled output comes from attentional pooling, whose softmax weights depend on every token, so it is "
            "not a sum of residual units. ResiDual needs a class-token readout.",
        )
    if getattr(tower, "pool_type", "tok") != "tok":
        raise _refuse(
            model,
            f"it pools with {tower.pool_type!r} instead of its class token; an average over the tokens is not one "
            "token's residual. ResiDual needs a class-token readout (pool_type='tok').",
        )
    blocks = tower.transformer.resblocks
    if not all(isinstance(base_module(block.attn), nn.MultiheadAttention) for block in blocks):
        raise _refuse(
            model,
            "its blocks are not ResidualAttentionBlocks with nn.MultiheadAttention (a CustomResidualAttentionBlock "
            "or another block type); only the standard open_clip ViT block is mapped.",
        )
    attention = base_module(blocks[0].attn)
    if not (attention.batch_first and attention._qkv_same_embed_dim) or attention.bias_k is not None:
        raise _refuse(model, "its attention is not batch-first self-attention with one packed in_proj.")
    _check_layer_norm(model, base_module(tower.ln_post), "ln_post")
    prefix = "visual." if tower is not model else ""
    layer_scale = getattr(base_module(blocks[0].ls_1), "gamma", None)
    return ArchitectureSpec(
        vision_config=None,
        embedding=f"{prefix}ln_pre",
        attention_out=f"{prefix}transformer.resblocks.{{i}}.attn",
        mlp_out=f"{prefix}transformer.resblocks.{{i}}.ls_2",
        mlp=f"{prefix}transformer.resblocks.{{i}}.mlp",
        final_norm=f"{prefix}ln_post",
        attention_layer_scale=f"{prefix}transformer.resblocks.{{i}}.ls_1.gamma" if layer_scale is not None else None,
        projection=f"{prefix}proj" if tower.proj is not None else None,
        tower=prefix.rstrip(".") or None,
        sizes=_open_clip_sizes,
        multihead_attention=True,
        projection_matrix=tower.proj is not None,
        keyword_input=False,
    )


def multihead_attention_heads(
    attention: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> torch.Tensor:
    """The concatenated head outputs ``[batch, queries, dim]`` that ``attention`` (batch-first, packed ``in_proj``)
    feeds its ``out_proj``, computed as its own forward computes them; takes ``nn.MultiheadAttention``'s arguments.

    Example:
        >>> heads = multihead_attention_heads(block.attn, x, x, x, need_weights=False)
        >>> torch.allclose(block.attn.out_proj(heads), block.attn(x, x, x, need_weights=False)[0], atol=1e-6)
        True
    """
    if need_weights or key_padding_mask is not None or is_causal:
        raise ResiDualInputError(
            "An adapted nn.MultiheadAttention runs with need_weights=False and no key_padding_mask or is_causal "
            "(as open_clip's vision blocks call it); call it that way, or on the base model."
        )
    heads = attention.num_heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    if query is key and key is value:  # self-attention: one matrix product, as the module's own fast path
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:  # e.g. the query of the CLS token alone (a recording pass's last block)
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weight.chunk(3), biases, strict=True))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = attn_mask.logical_not()  # nn.MultiheadAttention masks True; scaled_dot_product_attention keeps it
    out = F.scaled_dot_product_attention(
        *(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)),
        attn_mask=attn_mask,
        dropout_p=attention.dropout if attention.training else 0.0,
    )
    return out.transpose(1, 2).flatten(2)


# --------------------------------------------------------------------------------------------------------------- timm


def _timm_sizes(model: nn.Module) -> Sizes:
    attention = model.blocks[0].attn
    return Sizes(
        num_layers=len(model.blocks),
        num_heads=attention.num_heads,
        hidden_size=model.embed_dim,
        head_dim=attention.head_dim,
        patch_size=_square_patch(model, model.patch_embed.patch_size),
    )


def timm_spec(model: nn.Module) -> ArchitectureSpec:
    """The spec of a ``timm.models.VisionTransformer`` with class-token pooling, or why it is refused."""
    if getattr(model, "attn_pool", None) is not None:
        raise _refuse(
            model,
            "it pools with an attention-pooling head (global_pool='map'), whose softmax weights depend on every "
            "token, so its output is not a sum of residual units. ResiDual needs global_pool='token'.",
        )
    if model.cls_token is None or model.global_pool != "token":
        raise _refuse(
            model,
            f"it pools with global_pool={model.global_pool!r}, not its class token: an average over the tokens is "
            "not one token's residual. Create it with global_pool='token' (and class_token=True).",
        )
    if not all(type(block).__name__ == "Block" and hasattr(block.attn, "proj") for block in model.blocks):
        raise _refuse(
            model,
            f"its blocks are {type(model.blocks[0]).__name__}, not timm's pre-norm Block with an attention output "
            "projection; only that block is mapped.",
        )
    fc_norm = isinstance(base_module(model.fc_norm), nn.LayerNorm)  # a norm on the pooled token instead of the sequence
    final_norm = "fc_norm" if fc_norm else "norm"
    _check_layer_norm(model, base_module(getattr(model, final_norm)), final_norm)
    layer_scale = getattr(base_module(model.blocks[0].ls1), "gamma", None)
    return ArchitectureSpec(
        vision_config=None,
        embedding="norm_pre",
        attention_out="blocks.{i}.attn.proj",
        mlp_out="blocks.{i}.ls2",
        mlp="blocks.{i}.mlp",
        final_norm=final_norm,
        attention_layer_scale="blocks.{i}.ls1.gamma" if layer_scale is not None else None,
        projection="head" if isinstance(base_module(model.head), nn.Linear) else None,
        pooled="cls",
        sizes=_timm_sizes,
        keyword_input=False,
    )
