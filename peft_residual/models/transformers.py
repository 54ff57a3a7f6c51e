"""Vision transformers of ``transformers``: CLIP, DINOv2, ViT and BLIP (each tower alone, and inside the model that
adds its projection or text tower), and the classes refused with the reason (SigLIP, ``BlipModel``).

Each class has one fixed :class:`.ArchitectureSpec`; its sizes come from the model's (vision) config. This module
names classes only; it never imports transformers.
"""

from __future__ import annotations

from torch import nn

from .registry import refuse_model, register_model
from .spec import ArchitectureSpec

CLIP_TOWER = ArchitectureSpec(
    vision_config=None,
    embedding="pre_layrnorm",
    attention_out="encoder.layers.{i}.self_attn.out_proj",
    mlp_out="encoder.layers.{i}.mlp",
    final_norm="post_layernorm",
)

# BLIP's vision model applies post_layernorm twice to the pooled output (pooler_output = LN(LN(CLS))); its image-text
# contrastive head reads the once-normed CLS token, last_hidden_state[:, 0], which is what is decomposed: alone, and
# through vision_proj in the retrieval model.
BLIP_TOWER = ArchitectureSpec(
    vision_config=None,
    embedding="embeddings",
    attention_out="encoder.layers.{i}.self_attn.projection",  # q, k and v come from one packed qkv linear
    mlp_out="encoder.layers.{i}.mlp",
    final_norm="post_layernorm",
    pooled="cls",
)

SPECS: dict[str, ArchitectureSpec] = {
    "CLIPVisionModel": CLIP_TOWER,
    "CLIPVisionModelWithProjection": CLIP_TOWER.under(
        "vision_model", projection="visual_projection", tower="vision_model"
    ),
    "CLIPModel": CLIP_TOWER.under(
        "vision_model", vision_config="vision_config", projection="visual_projection", tower="vision_model"
    ),
    "Dinov2Model": ArchitectureSpec(
        vision_config=None,
        embedding="embeddings",
        attention_out="encoder.layer.{i}.attention.o_proj",
        attention_layer_scale="encoder.layer.{i}.layer_scale1.lambda1",
        mlp_out="encoder.layer.{i}.layer_scale2",
        mlp="encoder.layer.{i}.mlp",
        final_norm="layernorm",
    ),
    # ViTModel's pooler_output is tanh(dense(CLS)), not linear in the units: the embedding is the normed CLS token,
    # which is also what ViTForImageClassification classifies.
    "ViTModel": ArchitectureSpec(
        vision_config=None,
        embedding="embeddings",
        attention_out="layers.{i}.attention.o_proj",
        mlp_out="layers.{i}.mlp",
        final_norm="layernorm",
        pooled="cls",
    ),
    "BlipVisionModel": BLIP_TOWER,
    "BlipForImageTextRetrieval": BLIP_TOWER.under(
        "vision_model", vision_config="vision_config", projection="vision_proj", tower="vision_model"
    ),
}
"""The fixed spec of each transformers class."""


@register_model(*SPECS)
def transformers_spec(model: nn.Module) -> ArchitectureSpec:
    """The fixed spec of a transformers model's class."""
    return SPECS[type(model).__name__]


_SIGLIP = (
    "SigLIP has no CLS token: its pooled output comes from an attention-pooling head whose softmax weights depend on "
    "every token, so it is not a sum of residual units, and no single token's residual is either. ResiDual needs a "
    "pooled output that is a linear readout of one token (CLIP, DINOv2, ViT, BLIP)."
)
refuse_model("SiglipVisionModel", "SiglipModel", "Siglip2VisionModel", "Siglip2Model", reason=_SIGLIP)
refuse_model(
    "BlipModel",
    reason="BlipModel's image features normalise the CLS token twice (post_layernorm, then again on the pooled "
    "token), which this decomposition does not linearise. Load the checkpoint as BlipForImageTextRetrieval (as "
    "load_vision_model does): its image-text contrastive head reads the once-normed CLS token through vision_proj, "
    "and BlipVisionModel's last_hidden_state[:, 0] is the same token.",
)
