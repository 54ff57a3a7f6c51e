"""What a PEFT user does out of habit, and ResiDual honours or refuses with the reason: ``autocast_adapter_dtype``
on load, ``modules_to_save``, ``target_modules``, ``inject_adapter_in_model``, ``safe_serialization=False``, file
modes, damaged files and empty batches."""

import os
import stat
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file

from peft_residual import ResiDualConfig, ResiDualInputError, embed_images, fit_residual_bases, train_residual

from .conftest import image_dataset, images, make_model


def fitted(kind: str = "dinov2", dtype: torch.dtype = torch.float32, **config) -> PeftModel:
    model = get_peft_model(make_model(kind).to(dtype), ResiDualConfig(k=3, **config))
    fit_residual_bases(model, [{"pixel_values": images(32).to(dtype)}], progress=False)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_is_honoured_on_load_as_on_creation(tmp_path, dtype, autocast):
    fitted(dtype=dtype).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("dinov2").to(dtype), tmp_path, autocast_adapter_dtype=autocast)
    created = get_peft_model(make_model("dinov2").to(dtype), ResiDualConfig(k=3), autocast_adapter_dtype=autocast)
    fit_residual_bases(created, [{"pixel_values": images(32).to(dtype)}], progress=False)
    expected = torch.float32 if autocast else dtype  # PEFT's rule: half precision is upcast unless told not to
    for model in (loaded, created):
        scales = [p for name, p in model.named_parameters() if "residual_lambda" in name]
        assert scales and {p.dtype for p in scales} == {expected}


def test_modules_to_save_is_trained_saved_counted_and_loaded_back(tmp_path):
    model = fitted("clip", modules_to_save=["text_projection"])
    copy = model.base_model.model.text_projection.modules_to_save["default"]
    assert copy.weight.requires_grad
    trainable, _ = model.get_nb_trainable_parameters()
    scales = sum(p.numel() for name, p in model.named_parameters() if "residual_lambda" in name)
    assert trainable == scales + copy.weight.numel()  # PEFT's count includes the saved module
    with torch.no_grad():
        copy.weight.add_(1.0)  # as training would
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.text_projection.weight"], copy.weight)
    loaded = PeftModel.from_pretrained(make_model("clip"), tmp_path)
    assert torch.equal(loaded.base_model.model.text_projection.modules_to_save["default"].weight, copy.weight)
    torch.testing.assert_close(embed_images(loaded, images(4)), embed_images(model, images(4)))
    with model.disable_adapter():  # PEFT serves the original module to the base model
        assert not torch.equal(model.base_model.model.text_projection(torch.ones(1, 32)), copy(torch.ones(1, 32)))


def test_train_residual_refuses_modules_it_cannot_train():
    model = fitted("clip", modules_to_save=["text_projection"])
    with pytest.raises(ResiDualInputError, match=r"modules_to_save=\['text_projection'\].*transformers\.Trainer"):
        train_residual(model, None, image_dataset(16), image_dataset(8))


@pytest.mark.parametrize("name", ["visual_projection", "encoder", "mlp"])
def test_modules_to_save_may_not_name_what_residual_wraps(name):
    with pytest.raises(ResiDualInputError, match=rf"modules_to_save names '{name}', which is or holds .*classifier"):
        get_peft_model(make_model("clip_vision_projection"), ResiDualConfig(k=3, modules_to_save=[name]))


def test_a_user_set_target_modules_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ResiDualInputError, match=r"target_modules is written by the tuner.*`units`, `layers`"):
        ResiDualConfig(k=3, target_modules=["encoder.layer.0.attention.output.dense"])
    model = fitted()
    written = model.peft_config["default"].target_modules
    assert written and all(isinstance(path, str) for path in written)  # what the tuner injected, saved and reloaded
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("dinov2"), tmp_path)
    assert loaded.peft_config["default"].target_modules == written


def test_inject_adapter_in_model_refuses_with_peft_s_shared_state_reason():
    with pytest.raises(ValueError, match=r"uses shared state stored on the tuner.*get_peft_model"):
        inject_adapter_in_model(ResiDualConfig(k=3), make_model("dinov2"))


def test_pickle_serialization_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ResiDualInputError, match=r"safetensors only.*Drop the argument"):
        fitted().save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(tmp_path, umask):
    model = fitted()
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path)
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["adapter_config.json", "adapter_model.safetensors", "README.md"], 0o666 & ~umask)


@pytest.mark.parametrize("keep", [5, 0.5])
def test_a_truncated_weights_file_is_refused_naming_the_file(tmp_path, keep):
    fitted().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ResiDualInputError, match=rf"{weights} is not a readable safetensors file.*save the adapter"):
        PeftModel.from_pretrained(make_model("dinov2"), tmp_path)


def test_a_config_that_is_not_json_is_refused_naming_the_file(tmp_path):
    fitted().save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text("{not json")
    with pytest.raises(ResiDualInputError, match=rf"{config} is not valid JSON.*save the adapter again"):
        PeftModel.from_pretrained(make_model("dinov2"), tmp_path)


@pytest.mark.parametrize("shape", [(0, 3, 32, 32), (3, 32, 32)])
def test_a_batch_without_images_is_refused_at_forward_and_fit(shape):
    model = fitted()
    with pytest.raises(ResiDualInputError, match=rf"at least one image, got shape \({shape[0]}, 3"):
        model(pixel_values=torch.zeros(shape))
    with pytest.raises(ResiDualInputError, match="fit_residual_bases batch 0: "):
        fit_residual_bases(model, [{"pixel_values": torch.zeros(shape)}], progress=False)


def test_get_peft_model_raises_no_warning_a_user_cannot_act_on():
    """In a fresh process, every warning an error: the package's filters are what a user's script runs under."""
    script = (
        "import torch; from peft import get_peft_model; from transformers import Dinov2Config, Dinov2Model; "
        "import peft_residual as pr; "
        "config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, "
        "image_size=32, patch_size=8); "
        "model = get_peft_model(Dinov2Model(config), pr.ResiDualConfig(k=3)); "
        "pr.fit_residual_bases(model, [{'pixel_values': torch.randn(16, 3, 32, 32)}], progress=False); "
        "model(pixel_values=torch.randn(2, 3, 32, 32))"
    )
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr
