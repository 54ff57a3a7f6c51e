"""Saving and loading an adapter: bit-identical round trips, what is stored and how, and loading refused onto
another base."""

import json

import pytest
import torch
from peft import AutoPeftModel, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_residual import ResiDualConfig, ResiDualInputError, fit_residual_bases

from .conftest import images, loader, make_model, model_output
from .testing_utils import fitted, reference_float64


def test_save_and_reload_is_bit_identical(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_model("clip_vision_projection").save_pretrained(base_dir)
    from transformers import CLIPVisionModelWithProjection

    model = get_peft_model(CLIPVisionModelWithProjection.from_pretrained(base_dir), ResiDualConfig(k=3))
    fit_residual_bases(model, loader(), progress=False)
    model.save_pretrained(adapter_dir)
    saved = sorted(p.name for p in adapter_dir.iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    expected = {
        f"base_model.model.vision_model.encoder.layers.{i}.self_attn.out_proj.{name}"
        for i in range(2)
        for name in ("residual_lambda", "residual_basis", "residual_mean", "residual_rank")
    }
    assert set(tensors) == expected
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "RESIDUAL"

    x = images(4)
    with torch.no_grad():
        expected_out = model(pixel_values=x).image_embeds
        again = PeftModel.from_pretrained(CLIPVisionModelWithProjection.from_pretrained(base_dir), adapter_dir)
        assert torch.equal(again(pixel_values=x).image_embeds, expected_out)
        auto = AutoPeftModel.from_pretrained(adapter_dir)
        assert torch.equal(auto(pixel_values=x).image_embeds, expected_out)
    config = PeftConfig.from_pretrained(adapter_dir)
    assert isinstance(config, ResiDualConfig) and config.k == 3


def test_loading_onto_another_base_is_a_clear_error(tmp_path):
    model = fitted("clip_vision_projection", ResiDualConfig(k=3))
    model.save_pretrained(tmp_path)
    signature = json.loads((tmp_path / "adapter_config.json").read_text())["base_signature"]
    assert signature["image_size"] == [32, 32] and signature["num_tokens"] == 1 + 4 * 4
    assert signature["patch_size"] == 8 and signature["hidden_size"] == 32
    cases = [
        ({"projection_dim": 16}, r"output_dim 24 vs 16"),
        ({"num_hidden_layers": 3}, r"num_layers 2 vs 3"),
        ({"hidden_size": 48, "intermediate_size": 96}, r"hidden_size 32 vs 48"),
        ({"patch_size": 16}, r"patch_size 8 vs 16"),
    ]
    for overrides, message in cases:
        with pytest.raises(ResiDualInputError, match=rf"fitted on another base model \({message}"):
            PeftModel.from_pretrained(make_model("clip_vision_projection", **overrides), tmp_path)
    with pytest.raises(ResiDualInputError, match=r"tower_type 'CLIPVision\w+' vs 'Dinov2Model'"):
        PeftModel.from_pretrained(make_model("dinov2"), tmp_path)
    with pytest.raises(ResiDualInputError, match="base weights"):  # same shapes, other weights
        PeftModel.from_pretrained(make_model("clip_vision_projection", seed=1), tmp_path)
    same_in_half = make_model("clip_vision_projection").half()  # a dtype cast is still the same base
    assert isinstance(PeftModel.from_pretrained(same_in_half, tmp_path), PeftModel)


def test_per_unit_shape_checks_name_the_unit(tmp_path):
    model = fitted("clip_vision_projection", ResiDualConfig(k=3, units="heads+mlps"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_signature"]["output_dim"] = 16  # a doctored signature: the tensor shapes still disagree
    config["base_signature"].pop("weights_fingerprint")
    path.write_text(json.dumps(config))
    other = make_model("clip_vision_projection", projection_dim=16)
    with pytest.raises(
        ResiDualInputError, match=r"Unit layer0\.mlp: the checkpoint's mean has shape \(1, 24\).*\(1, 16\)"
    ):
        PeftModel.from_pretrained(other, tmp_path)


def test_loading_an_adapter_without_signature_is_an_error(tmp_path):
    model = fitted("clip_vision", ResiDualConfig(k=2))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.pop("base_signature")
    path.write_text(json.dumps(config))
    with pytest.raises(ResiDualInputError, match="no base_signature"):
        PeftModel.from_pretrained(make_model("clip_vision"), tmp_path)


def test_coarse_has_one_trainable_scale_per_head(tmp_path):
    model = fitted("clip_vision", ResiDualConfig.coarse())
    assert model.get_nb_trainable_parameters()[0] == 2 * 4
    x = images(3)
    with torch.no_grad():
        expected = model(pixel_values=x).pooler_output
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make_model("clip_vision"), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).pooler_output, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_bases_round_trip_and_stay_close(tmp_path, dtype):
    full = fitted("dinov2", ResiDualConfig.residual())
    half = fitted("dinov2", ResiDualConfig.residual(basis_dtype=dtype))
    x = images(4, seed=8)
    with torch.no_grad():
        expected, got = model_output(full, x), model_output(half, x)
    assert float((got - expected).abs().max()) <= 2e-2 * float(expected.abs().max())
    # the bases are stored in half precision, the transform is not: float32 agrees with a float64 oracle on the same
    # stored bases far below half precision's rounding (a readout in float16 misses this by two orders)
    oracle = reference_float64(half, x)
    torch.testing.assert_close(got.double(), oracle, rtol=0, atol=1e-5 * float(oracle.abs().max()))
    half.save_pretrained(tmp_path / "half")
    full.save_pretrained(tmp_path / "full")
    tensors = load_file(tmp_path / "half" / "adapter_model.safetensors")
    bases = [t for key, t in tensors.items() if "residual_basis" in key]
    assert bases and all(t.dtype == getattr(torch, dtype) for t in bases)
    full_bases = [t for key, t in load_file(tmp_path / "full" / "adapter_model.safetensors").items() if "basis" in key]
    assert sum(t.nbytes for t in bases) * 2 == sum(t.nbytes for t in full_bases)
    sizes = {name: (tmp_path / name / "adapter_model.safetensors").stat().st_size for name in ("half", "full")}
    assert sizes["half"] < sizes["full"] - sum(t.nbytes for t in bases) * 0.9
    again = PeftModel.from_pretrained(make_model("dinov2"), tmp_path / "half")
    with torch.no_grad():
        assert torch.equal(model_output(again, x), got)
    layer = again.base_model.readout.layers_of("default")[1]
    basis = layer.output_space("default")[1][: int(layer.residual_rank["default"][0])].double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis), dtype=torch.float64), rtol=0, atol=1e-6)


def test_head_bases_are_stored_in_head_coordinates(tmp_path):
    model = fitted("clip_vision_projection", ResiDualConfig(k=3, units="heads+mlps"))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    head = "base_model.model.vision_model.encoder.layers.0.self_attn.out_proj"
    mlp = "base_model.model.vision_model.encoder.layers.0.mlp"
    # 3 rows of head_dim + 2 = 10 coefficients per head (3*10 - 6 reflector values; the shared norm mean adds a
    # direction to head_dim + 1), 3 output-space rows per MLP
    assert tensors[f"{head}.residual_basis"].shape == (4 * (3 * 10 - 6),)
    assert tensors[f"{head}.residual_mean"].shape == (4, 10)
    assert tensors[f"{mlp}.residual_basis"].shape == (3 * 24 - 6,)


def test_an_adapter_loads_onto_another_model_class_with_the_same_tower_and_projection(tmp_path):
    """Fitted on CLIPVisionModelWithProjection, loaded onto a CLIPModel holding the same vision weights (what the
    CLI loads): the same adapted image embedding."""
    clip = make_model("clip")
    vision = make_model("clip_vision_projection")
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    adapted = get_peft_model(vision, ResiDualConfig(k=3))
    fit_residual_bases(adapted, loader(), progress=False)
    adapted.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clip, tmp_path)
    x = images(4)
    torch.testing.assert_close(model_output(loaded, x), model_output(adapted, x), rtol=0, atol=1e-6)
    with torch.no_grad(), loaded.disable_adapter():
        assert not torch.allclose(model_output(loaded, x), model_output(adapted, x), atol=1e-4)


def test_cast_bases_gives_what_a_half_precision_fit_stores(tmp_path):
    """``readout.cast_bases`` (what ``benchmarks.speed`` saves): the stored bases in float16, the config saying so,
    and the output recomputed from them, close to float32's and equal after a save and load."""
    model = fitted("dinov2", ResiDualConfig.residual())
    x = images(4, seed=8)
    with torch.no_grad():
        before = model_output(model, x)
        model.base_model.readout.cast_bases("default", torch.float16)
        after = model_output(model, x)
    assert model.peft_config["default"].basis_dtype == "float16"
    assert 0 < float((after - before).abs().max()) <= 2e-2 * float(before.abs().max())  # rebuilt from the cast
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    bases = [t for key, t in tensors.items() if "residual_basis" in key]
    assert bases and all(t.dtype == torch.float16 for t in bases)
    again = PeftModel.from_pretrained(make_model("dinov2"), tmp_path)
    with torch.no_grad():
        assert torch.equal(model_output(again, x), after)


def test_the_card_links_a_hub_base_model_but_not_a_local_path(tmp_path):
    """The Hub refuses a ``base_model`` that is not a model id: a local path stays in the card's text only."""
    from huggingface_hub import ModelCard

    from peft_residual.hub import model_card

    model = fitted("dinov2", ResiDualConfig(k=2))
    for base, linked in [("facebook/dinov2-small", True), (str(tmp_path), False), ("../models/dino", False)]:
        model.peft_config["default"].base_model_name_or_path = base
        card = model_card(model)
        assert (card.data.base_model == base) is linked and (base in card.data.tags) is linked, base
        assert f"Base model: `{base}`" in card.text
        assert ModelCard(str(card)).data.base_model == (base if linked else None)  # as the YAML reads back


@pytest.mark.parametrize("basis_dtype", ["float32", "float16"])
def test_casting_the_model_keeps_the_packed_bases_in_their_storage_dtype(tmp_path, basis_dtype):
    """The packed bases are a storage format: model.to(bfloat16) or .double() moves them with the model but keeps
    basis_dtype, so a save still holds what adapter_config.json says, bit for bit as fitted."""
    model = fitted("dinov2", ResiDualConfig(k=3, basis_dtype=basis_dtype))
    model.save_pretrained(tmp_path / "before")
    for dtype in (torch.bfloat16, torch.float64):
        model.to(dtype)
        layers = model.base_model.unit_layers()
        assert {str(layer.residual_basis["default"].dtype) for layer in layers if "default" in layer.residual_basis} \
            == {f"torch.{basis_dtype}"}  # fmt: skip
        model.save_pretrained(tmp_path / str(dtype))
        saved, before = (load_file(tmp_path / name / "adapter_model.safetensors") for name in (str(dtype), "before"))
        bases = [key for key in saved if "residual_basis" in key]
        assert bases and all(torch.equal(saved[key], before[key]) for key in bases), dtype
        config = json.loads((tmp_path / str(dtype) / "adapter_config.json").read_text())
        assert config["basis_dtype"] == basis_dtype
        model_output(model, images(2))  # the cast model still reads out
