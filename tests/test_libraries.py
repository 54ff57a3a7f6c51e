"""open_clip and timm: one ViT's weights in two libraries give the same units and ResiDual outputs, the variants
each library offers are read or refused with the reason, and open_clip's zero-shot head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from peft_residual import ResiDualConfig, ZeroShotClassifier, decompose_units, embed_images, fit_residual_bases
from peft_residual.models import multihead_attention_heads
from peft_residual.tuner.config import ResiDualInputError

from .conftest import CLASS_NAMES, TEXT, VISION, images, loader, make_open_clip, make_timm, model_output


def _hf_clip_and_open_clip_with_the_same_weights():
    torch.manual_seed(0)
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, hidden_act="gelu")).eval()  # open_clip's GELU
    oc = make_open_clip(VISION).eval()
    tower, hf_tower = oc.visual, hf.vision_model
    weights = {
        "conv1.weight": hf_tower.embeddings.patch_embedding.weight,
        "class_embedding": hf_tower.embeddings.class_embedding,
        "positional_embedding": hf_tower.embeddings.position_embedding.weight,
        "proj": hf.visual_projection.weight.T,
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for name in ("weight", "bias"):
            weights[f"{ours}.{name}"] = getattr(getattr(hf_tower, theirs), name)
    for i, layer in enumerate(hf_tower.encoder.layers):
        attention = layer.self_attn
        block = f"transformer.resblocks.{i}."
        for name in ("weight", "bias"):
            weights[block + f"attn.in_proj_{name}"] = torch.cat(
                [getattr(getattr(attention, p), name) for p in ("q_proj", "k_proj", "v_proj")]
            )
            pairs = (("attn.out_proj", attention.out_proj), ("ln_1", layer.layer_norm1), ("ln_2", layer.layer_norm2))
            pairs += (("mlp.c_fc", layer.mlp.fc1), ("mlp.c_proj", layer.mlp.fc2))
            for ours, module in pairs:
                weights[block + f"{ours}.{name}"] = getattr(module, name)
    missing, unexpected = tower.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=False)
    assert (missing, unexpected) == ([], [])
    return hf, oc


def test_open_clip_and_hf_clip_with_the_same_weights_give_equal_units_and_residual_outputs():
    hf, oc = _hf_clip_and_open_clip_with_the_same_weights()
    x = images(6, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(x), hf(pixel_values=x).image_embeds, rtol=0, atol=1e-5)
    hf_units, oc_units = decompose_units(hf, x), decompose_units(oc, x)
    assert hf_units.names == oc_units.names
    torch.testing.assert_close(oc_units.contributions, hf_units.contributions, rtol=0, atol=1e-5)

    outputs = []
    for model in (hf, oc):
        peft_model = get_peft_model(model, ResiDualConfig.residual())
        fit_residual_bases(peft_model, loader(), progress=False)
        generator = torch.Generator().manual_seed(7)
        for layer in peft_model.base_model.readout.transformed_layers("default"):
            scales = layer.residual_lambda["default"]
            scales.data.copy_(1 + torch.randn(scales.shape, generator=generator))
        with torch.no_grad():
            outputs.append(model_output(peft_model, x))
            with peft_model.disable_adapter():
                base = model_output(peft_model, x)
        assert (outputs[-1] - base).abs().max() > 0.1  # the adapter changes the output
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, build",
    [
        ("open_clip VisionTransformer alone", lambda: make_open_clip(VISION).visual),
        ("open_clip without ln_pre or proj", lambda: _without_projection(make_open_clip(VISION, no_ln_pre=True))),
        ("timm without a head", lambda: make_timm(VISION, num_classes=0)),
        ("timm with fc_norm", lambda: make_timm(VISION, num_classes=5, fc_norm=True)),
        ("timm with register tokens", lambda: make_timm(VISION, num_classes=0, reg_tokens=2)),
    ],
)
def test_other_variants_sum_to_their_output_and_adapt(name, build):
    model = build().eval()
    x = images(4, seed=2)
    with torch.no_grad():
        base = embed_images(model, x)
    units = decompose_units(model, x)
    torch.testing.assert_close(units.contributions.sum(1), base, rtol=0, atol=1e-5)
    assert units.contributions.std(0).amax(-1).min() > 0  # every unit moves with the image
    peft_model = get_peft_model(model, ResiDualConfig(k=4))
    fit_residual_bases(peft_model, loader(), progress=False)
    with torch.no_grad():
        adapted = embed_images(peft_model, x)
        with peft_model.disable_adapter():
            torch.testing.assert_close(embed_images(peft_model, x), base, rtol=0, atol=0)
    assert adapted.shape == base.shape and (adapted - base).abs().max() > 1e-3


def _without_projection(model):
    model.visual.proj = None
    return model


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: make_open_clip(VISION, attentional_pool=True), "attentional pooling"),
        (lambda: make_open_clip(VISION, pool_type="avg"), "pools with 'avg'"),
        (lambda: make_timm(VISION, global_pool="avg"), "global_pool='avg'"),
        (lambda: make_timm(VISION, global_pool="map"), "attention-pooling head"),
        (lambda: make_timm(VISION, global_pool="avg", class_token=False), "global_pool='avg'"),
    ],
)
def test_pooling_that_is_not_a_class_token_readout_is_refused_with_the_reason(build, reason):
    with pytest.raises(ResiDualInputError, match=reason):
        get_peft_model(build(), ResiDualConfig(k=4))


def test_multihead_attention_in_steps_equals_the_module_and_refuses_what_it_does_not_serve():
    attention = make_open_clip(VISION).visual.transformer.resblocks[0].attn.eval()
    x = torch.randn(2, 5, VISION["hidden_size"])
    with torch.no_grad():  # the module's fused fast path
        expected = attention(x, x, x, need_weights=False)[0]
        heads = multihead_attention_heads(attention, x, x, x, need_weights=False)
        cls_heads = multihead_attention_heads(attention, x[:, :1], x, x, need_weights=False)  # separate q, k, v
    torch.testing.assert_close(attention.out_proj(heads), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(cls_heads, heads[:, :1], rtol=0, atol=1e-6)
    with pytest.raises(ResiDualInputError, match="need_weights=False"):
        multihead_attention_heads(attention, x, x, x)  # nn.MultiheadAttention's default asks for the weights


def test_open_clip_zero_shot_head_is_the_normalised_mean_of_normalised_prompt_embeddings():
    model = make_open_clip(VISION).eval()
    templates = ["a photo of a {}.", "a big {}."]
    words = {word: i + 3 for i, word in enumerate(" ".join(templates + CLASS_NAMES).replace(".", " ").split())}

    def tokenizer(texts: list[str]) -> torch.Tensor:  # open_clip's interface: ids padded to the context length
        ids = torch.zeros(len(texts), 16, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [1, *(words[w] for w in text.replace(".", " ").split()), 2]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids

    classifier = ZeroShotClassifier.from_open_clip(model, tokenizer, CLASS_NAMES, templates=templates)
    with torch.no_grad():
        expected = torch.stack(
            [
                F.normalize(
                    F.normalize(model.encode_text(tokenizer([t.format(n) for t in templates])), dim=-1).mean(0), dim=0
                )
                for n in CLASS_NAMES
            ]
        )
    torch.testing.assert_close(classifier.weights, expected)
    assert classifier.scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert TEXT["vocab_size"] > max(words.values())


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
def test_the_one_pass_user_path_trains_saves_and_loads(kind, tmp_path):
    """collect_units once, fit, centroids from the stored units, train_residual on the cache, save, load."""
    from peft import PeftModel

    from peft_residual import collect_units, default_classifier, train_residual

    from .conftest import learnable_images, make_model

    x, y = learnable_images(128, seed=3)
    batches = [{"pixel_values": x[i : i + 32], "label": y[i : i + 32]} for i in range(0, 128, 32)]
    model = get_peft_model(make_model(kind), ResiDualConfig(k=4))
    train_units, val_units = (
        collect_units(model, batches[:3], progress=False),
        collect_units(model, batches[3:], progress=False),
    )
    fit_residual_bases(model, train_units, progress=False)
    classifier = default_classifier(model, CLASS_NAMES, kind="centroid", train_units=train_units, progress=False)
    before = [p.detach().clone() for n, p in model.named_parameters() if "residual_lambda" in n]
    result = train_residual(model, classifier, train_units, val_units, max_epochs=3, progress=False)
    after = [p.detach() for n, p in model.named_parameters() if "residual_lambda" in n]
    assert result.cached and result.epochs_run >= 1
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(kind), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(embed_images(loaded, x[:8]), embed_images(model, x[:8]), rtol=0, atol=0)


def test_an_open_clip_tower_that_also_returns_its_tokens_adapts_the_pooled_output_only():
    """With ``output_tokens=True`` the tower returns ``(pooled, tokens)``: the readout replaces the pooled
    embedding, as the same weights give without tokens, and leaves the tokens as the base model computes them."""
    x = images(4, seed=2)
    outputs = []
    for output_tokens in (False, True):
        torch.manual_seed(0)  # the same weights both times
        model = make_open_clip(VISION, output_tokens=output_tokens).eval()
        with torch.no_grad():
            base = model.visual(x)
        peft_model = get_peft_model(model, ResiDualConfig(k=4))
        fit_residual_bases(peft_model, loader(), progress=False)
        with torch.no_grad():
            outputs.append((base, peft_model.base_model.model.visual(x)))
    (_, adapted), ((base_pooled, base_tokens), (pooled, tokens)) = outputs
    torch.testing.assert_close(pooled, adapted, rtol=0, atol=0)
    # the adapted pass runs the attention in steps, equal to the fused module within float rounding
    torch.testing.assert_close(tokens, base_tokens, rtol=0, atol=1e-5)
    assert (pooled - base_pooled).abs().max() > 1e-3
