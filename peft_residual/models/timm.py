"""Vision transformers of timm: ``timm.models.VisionTransformer`` with class-token pooling.

timm has no transformers config, so the spec reads the sizes off the modules, and is built per model: layer scales,
a classifier head and the final norm's place differ between variants of one class. ``norm_pre`` gives the embedding
unit, each ``Block`` ``attn.proj`` and an MLP behind ``ls2``, then ``norm`` (or ``fc_norm``) and any linear ``head``.

timm is imported by the models a user passes in; this module never imports it.
"""

from __future__ import annotations

from torch import nn

from .registry import register_model
from .spec import ArchitectureSpec, Sizes, base_module, check_layer_norm, refusal, square_patch


def _sizes(model: nn.Module) -> Sizes:
    attention = model.blocks[0].attn
    return Sizes(
        num_layers=len(model.blocks),
        num_heads=attention.num_heads,
        hidden_size=model.embed_dim,
        head_dim=attention.head_dim,
        patch_size=square_patch(model, model.patch_embed.patch_size),
    )


@register_model("timm.VisionTransformer")
def timm_spec(model: nn.Module) -> ArchitectureSpec:
    """The spec of a ``timm.models.VisionTransformer`` with class-token pooling, or why it is refused."""
    if getattr(model, "attn_pool", None) is not None:
        raise refusal(
            model,
            "it pools with an attention-pooling head (global_pool='map'), whose softmax weights depend on every "
            "token, so its output is not a sum of residual units. ResiDual needs global_pool='token'.",
        )
    if model.cls_token is None or model.global_pool != "token":
        raise refusal(
            model,
            f"it pools with global_pool={model.global_pool!r}, not its class token: an average over the tokens is "
            "not one token's residual. Create it with global_pool='token' (and class_token=True).",
        )
    if not all(type(block).__name__ == "Block" and hasattr(block.attn, "proj") for block in model.blocks):
        raise refusal(
            model,
            f"its blocks are {type(model.blocks[0]).__name__}, not timm's pre-norm Block with an attention output "
            "projection; only that block is mapped.",
        )
    fc_norm = isinstance(base_module(model.fc_norm), nn.LayerNorm)  # a norm on the pooled token instead of the sequence
    final_norm = "fc_norm" if fc_norm else "norm"
    check_layer_norm(model, base_module(getattr(model, final_norm)), final_norm)
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
        sizes=_sizes,
        keyword_input=False,
    )
