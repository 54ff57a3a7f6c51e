"""Vision transformers of ``transformers``: CLIP, DINOv2, ViT and BLIP (each tower alone, and inside the model that
adds its projection or text tower), ViT's and DINOv2's image classifiers, and the classes refused with the reason
(SigLIP, ``BlipModel``, ``CLIPForImageClassification``).

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

# The image classifiers whose head reads the decomposed embedding: ResiDual adapts exactly what the head reads.
# ViTForImageClassification classifies the normed CLS token, last_hidden_state[:, 0], ViTModel's embedding.
# Dinov2ForImageClassification classifies [CLS, mean of the patch tokens] of the normed sequence: the readout replaces
# the CLS token of that sequence, so the head reads the adapted CLS beside the base model's patch mean (a mean over
# tokens, each normed at its own statistics, is not the CLS sum of units ResiDual decomposes; it stays exact, as
# the base model computes it).
SPECS["ViTForImageClassification"] = SPECS["ViTModel"].under("vit", tower="vit", classifier="classifier")
SPECS["Dinov2ForImageClassification"] = SPECS["Dinov2Model"].under(
    "dinov2", tower="dinov2", classifier="classifier", classifier_input="cls+patch_mean"
)


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
    "CLIPForImageClassification",
    reason="Its classifier reads the mean of the patch tokens of CLIP's last_hidden_state, taken before "
    "post_layernorm: neither the CLS token nor normed, so not the sum of units ResiDual adapts, and ResiDual cannot "
    "change what this head reads. Use CLIPVisionModel (its pooler_output is the adapted CLS embedding) or "
    "CLIPVisionModelWithProjection / CLIPModel with a ZeroShotClassifier, and train a head on the adapted embedding "
    "with train_residual(..., head='linear') (CLI: peft-residual train --head linear).",
)
refuse_model(
    "BlipModel",
    reason="BlipModel's image features normalise the CLS token twice (post_layernorm, then again on the pooled "
    "token), which this decomposition does not linearise. Load the checkpoint as BlipForImageTextRetrieval (as "
    "load_vision_model does): its image-text contrastive head reads the once-normed CLS token through vision_proj, "
    "and BlipVisionModel's last_hidden_state[:, 0] is the same token.",
)
