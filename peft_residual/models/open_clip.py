"""Vision transformers of open_clip: ``open_clip.CLIP`` (and ``CustomTextCLIP``) and its ``VisionTransformer``.

open_clip has no transformers config, so the spec reads the sizes off the modules, and is built per model: layer
scales and the projection differ between variants of one class. ``ln_pre`` gives the embedding unit, each
``ResidualAttentionBlock`` an ``nn.MultiheadAttention`` (packed ``in_proj``) and an MLP behind ``ls_2``, then
``ln_post`` and the bare ``proj`` matrix. ``nn.MultiheadAttention`` computes its output projection inside one fused
function, never calling ``out_proj`` as a module, so the adapted model runs the same attention in separate steps
(:func:`.architecture.multihead_attention_heads`), which exposes the concatenated heads.

open_clip is imported by the models a user passes in; this module never imports it.
"""

from __future__ import annotations

from torch import nn

from .registry import register_model
from .spec import ArchitectureSpec, Sizes, base_module, check_layer_norm, refusal, square_patch


def _tower(model: nn.Module) -> nn.Module:
    return model.visual if hasattr(model, "visual") else model


def _sizes(model: nn.Module) -> Sizes:
    tower = _tower(model)
    attention = base_module(tower.transformer.resblocks[0].attn)
    return Sizes(
        num_layers=len(tower.transformer.resblocks),
        num_heads=attention.num_heads,
        hidden_size=attention.embed_dim,
        head_dim=attention.head_dim,
        patch_size=square_patch(model, tower.patch_size),
    )


@register_model("open_clip.CLIP", "open_clip.CustomTextCLIP", "open_clip.VisionTransformer")
def open_clip_spec(model: nn.Module) -> ArchitectureSpec:
    """The spec of an ``open_clip`` CLIP model (or of its ``VisionTransformer``), or why it is refused."""
    tower = _tower(model)
    if type(tower).__name__ != "VisionTransformer":
        raise refusal(model, f"its vision tower is {type(tower).__name__}; ResiDual reads open_clip ViTs only.")
    if getattr(tower, "attn_pool", None) is not None:
        raise refusal(
            model,
            "its pooled output comes from attentional pooling, whose softmax weights depend on every token, so it is "
            "not a sum of residual units. ResiDual needs a class-token readout.",
        )
    if getattr(tower, "pool_type", "tok") != "tok":
        raise refusal(
            model,
            f"it pools with {tower.pool_type!r} instead of its class token; an average over the tokens is not one "
            "token's residual. ResiDual needs a class-token readout (pool_type='tok').",
        )
    blocks = tower.transformer.resblocks
    if not all(isinstance(base_module(block.attn), nn.MultiheadAttention) for block in blocks):
        raise refusal(
            model,
            "its blocks are not ResidualAttentionBlocks with nn.MultiheadAttention (a CustomResidualAttentionBlock "
            "or another block type); only the standard open_clip ViT block is mapped.",
        )
    attention = base_module(blocks[0].attn)
    if not (attention.batch_first and attention._qkv_same_embed_dim) or attention.bias_k is not None:
        raise refusal(model, "its attention is not batch-first self-attention with one packed in_proj.")
    check_layer_norm(model, base_module(tower.ln_post), "ln_post")
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
        sizes=_sizes,
        multihead_attention=True,
        projection_matrix=tower.proj is not None,
        keyword_input=False,
    )
