import pytest
import torch

from peft_residual import Architecture, decompose_units
from peft_residual.models import find_base_model

from .conftest import images, make_model, model_output


@pytest.mark.parametrize("ln_mean", ["shared", "unit"])
def test_units_sum_to_model_output(kind, ln_mean):
    model = make_model(kind)
    x = images(6)
    units = decompose_units(model, x, ln_mean=ln_mean)
    arch = Architecture(model)
    assert units.contributions.shape == (6, arch.num_units, arch.output_dim)
    assert units.names[0] == "embedding" and units.names[-1] == f"layer{arch.num_layers - 1}.mlp"
    with torch.no_grad():
        expected = model_output(model, x)
    torch.testing.assert_close(units.contributions.sum(1), expected, rtol=1e-5, atol=1e-5)


def test_recording_pass_runs_the_last_block_on_cls_only_with_the_same_pieces(kind):
    """The recording pass feeds the last block's output projection and MLP the CLS token alone; every piece equals
    the one a full forward produces, and the model's own forward is left whole afterwards."""
    from peft_residual.recording import record_backbone, recording

    model = make_model(kind)
    arch = Architecture(model)
    x = images(5)
    with torch.no_grad(), recording(arch) as full:
        arch.run_tower(x)
    widths = []
    mlp = arch.module(arch.spec.mlp or arch.spec.mlp_out, arch.num_layers - 1)
    handle = mlp.register_forward_hook(lambda module, args, output: widths.append(args[0].shape[1]))
    cut = record_backbone(arch, x)
    with torch.no_grad():
        model_output(model, x)
    handle.remove()
    assert widths == [1, full.num_tokens]  # CLS only while recording, the whole sequence in a plain forward
    for layer in range(arch.num_layers):
        torch.testing.assert_close(cut.heads[layer], full.heads[layer], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cut.mlps[layer], full.mlps[layer], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cut.embedding, full.embedding, rtol=0, atol=0)


def test_decomposition_is_not_trivial(kind):
    """Every unit carries signal: dropping any single one changes the sum."""
    units = decompose_units(make_model(kind), images(4)).contributions
    assert (units.abs().amax(dim=(0, 2)) > 1e-4).all()


def test_unsupported_model_names_supported_types():
    with pytest.raises(ValueError, match=r"CLIPVisionModel.*Dinov2Model.*ViTModel"):
        find_base_model(torch.nn.Linear(2, 2))


def test_siglip_is_refused_with_the_reason():
    from peft import get_peft_model
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from peft_residual import ResiDualConfig, ResiDualInputError

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = SiglipVisionModel(SiglipVisionConfig(**config.to_dict() | {"image_size": 32, "patch_size": 8}))
    with pytest.raises(ResiDualInputError, match=r"SiglipVisionModel.*attention-pooling head.*not a sum of residual"):
        get_peft_model(model, ResiDualConfig(k=2))
    with pytest.raises(ResiDualInputError, match="no CLS token"):
        decompose_units(model, torch.randn(1, 3, 32, 32))


def test_blip_model_is_refused_naming_the_class_that_serves_its_contrastive_head():
    from transformers import BlipModel

    from peft_residual import ResiDualInputError

    retrieval = make_model("blip")
    with pytest.raises(ResiDualInputError, match=r"BlipModel.*twice.*BlipForImageTextRetrieval"):
        decompose_units(BlipModel(retrieval.config), torch.randn(1, 3, 32, 32))


def test_blip_embedding_is_the_once_normed_cls_token_its_contrastive_head_reads():
    """BlipVisionModel's pooler_output normalises the CLS token twice; the decomposed (and adapted) embedding is
    last_hidden_state[:, 0], which BLIP retrieval's vision_proj reads."""
    from peft_residual import embed_images

    vision, retrieval = make_model("blip_vision"), make_model("blip")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = vision(pixel_values=x)
        assert not torch.allclose(out.pooler_output, out.last_hidden_state[:, 0])
        torch.testing.assert_close(embed_images(vision, x), out.last_hidden_state[:, 0])
        tower = retrieval.vision_model(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(embed_images(retrieval, x), retrieval.vision_proj(tower))
        torch.testing.assert_close(decompose_units(retrieval, x).contributions.sum(1), retrieval.vision_proj(tower))


def test_vit_embedding_is_the_normed_cls_token_not_the_tanh_pooler():
    from peft_residual import embed_images

    model = make_model("vit")
    x = images(3)
    with torch.no_grad():
        out = model(pixel_values=x)
    torch.testing.assert_close(embed_images(model, x), out.last_hidden_state[:, 0])
    assert not torch.allclose(out.pooler_output, out.last_hidden_state[:, 0])


@pytest.mark.parametrize("ln_mean", ["shared", "unit"])
def test_heads_match_float64_recomputation(ln_mean):
    """A head's direct contribution, recomputed from raw weights in float64, equals the decomposition's: centred
    on its own mean, or (the paper's code) on its bias share of the whole residual's mean."""
    model = make_model("dinov2")
    x = images(3)
    captured = {}
    layer = model.encoder.layer[1]
    hidden = {}

    def keep_heads(module, args):
        captured["z"] = args[0][:, 0]

    def keep_residual(module, args, output):
        hidden["r"] = output.last_hidden_state[:, 0]

    handle = layer.attention.o_proj.register_forward_pre_hook(keep_heads)
    handle2 = model.encoder.register_forward_hook(keep_residual)
    units = decompose_units(model, x, ln_mean=ln_mean)
    handle.remove()
    handle2.remove()
    arch = Architecture(model)
    z = captured["z"].double().view(3, arch.num_heads, arch.head_dim)
    w = layer.attention.o_proj.weight.double().view(arch.hidden_size, arch.num_heads, arch.head_dim)
    b = layer.attention.o_proj.bias.double()
    ls = layer.layer_scale1.lambda1.double()
    r = hidden["r"].double()
    std = (r.var(-1, unbiased=False) + model.layernorm.eps).sqrt()
    share = 1.0 / ((2 * arch.num_layers + 1) * arch.num_heads)
    for h in range(arch.num_heads):
        u = (z[:, h] @ w[:, h].T + b / arch.num_heads) * ls
        mean = share * r.mean(-1, keepdim=True) if ln_mean == "shared" else u.mean(-1, keepdim=True)
        direct = model.layernorm.weight.double() * (u - mean) / std[:, None] + model.layernorm.bias.double() * share
        index = units.names.index(f"layer1.head{h}")
        torch.testing.assert_close(units.contributions[:, index].double(), direct, rtol=1e-5, atol=1e-6)


def test_the_two_mean_splits_differ_per_unit_but_not_in_sum():
    model = make_model("clip_vision_projection")
    x = images(4)
    shared, own = (decompose_units(model, x, ln_mean=m).contributions for m in ("shared", "unit"))
    assert float((shared - own).abs().max()) > 1e-3
    torch.testing.assert_close(shared.sum(1), own.sum(1), rtol=1e-5, atol=1e-5)
