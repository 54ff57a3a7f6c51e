"""PEFT's BaseTuner contract for a readout adapter, run over every architecture in ``KINDS``.

Per kind: get_peft_model and fit adapt the output; save and PeftModel.from_pretrained give the same output; a second
adapter can be added, set and deleted; disable_adapter gives the base output; unload gives the bare model with no
ResiDual layers; merge_adapter and unmerge_adapter round trip; only the scales train, and get_nb_trainable_parameters
counts them. test_peft_lifecycle.py covers the finer cases of each call on fewer kinds and more configs.
"""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_residual import ResiDualConfig, ResiDualInputError, ResiDualModel, fit_residual_bases
from peft_residual.tuner import ResiDualLayer

from .conftest import KINDS, images, loader, make_model, model_output, run_model


@pytest.fixture(scope="module", params=KINDS)
def fitted_kind(request):
    """One fitted adapter per kind, built once; tests that change it take deep copies."""
    model = get_peft_model(make_model(request.param), ResiDualConfig(k=2))
    fit_residual_bases(model, loader(), progress=False)
    return request.param, model


def outputs(model, x=None):
    with torch.no_grad():
        return model_output(model, images(3) if x is None else x)


class TestBaseTunerContract:
    def test_get_peft_model_and_fit_adapt_the_output(self, fitted_kind):
        kind, model = fitted_kind
        assert isinstance(model, PeftModel) and isinstance(model.base_model, ResiDualModel)
        assert any(isinstance(m, ResiDualLayer) for m in model.modules())
        assert not torch.allclose(outputs(model), outputs(make_model(kind)), atol=1e-4)

    def test_save_and_load_give_the_same_outputs_and_refuse_other_weights(self, fitted_kind, tmp_path):
        kind, model = fitted_kind
        model.save_pretrained(tmp_path)
        torch.testing.assert_close(
            outputs(PeftModel.from_pretrained(make_model(kind), tmp_path)), outputs(model), rtol=0, atol=0
        )
        with pytest.raises(ResiDualInputError, match="fingerprint"):
            PeftModel.from_pretrained(make_model(kind, seed=1), tmp_path)

    def test_add_set_and_delete_a_second_adapter(self, fitted_kind):
        _, model = fitted_kind
        model = copy.deepcopy(model)
        first = outputs(model)
        model.add_adapter("other", ResiDualConfig(k=1, seed=5))
        model.set_adapter("other")
        fit_residual_bases(model, loader(), progress=False)
        assert model.active_adapters == ["other"]
        assert not torch.allclose(outputs(model), first, atol=1e-5)
        model.set_adapter("default")
        assert torch.equal(outputs(model), first)
        model.delete_adapter("other")
        assert "other" not in model.peft_config
        for layer in (m for m in model.modules() if isinstance(m, ResiDualLayer)):
            assert "other" not in layer._all_available_adapter_names()
        assert torch.equal(outputs(model), first)

    def test_disable_adapter_gives_the_base_output_and_restores(self, fitted_kind):
        kind, model = fitted_kind
        adapted = outputs(model)
        with model.disable_adapter():
            assert torch.equal(outputs(model), outputs(make_model(kind)))
        assert torch.equal(outputs(model), adapted)

    def test_unload_gives_the_bare_model_with_no_residual_layers(self, fitted_kind):
        kind, model = fitted_kind
        bare = copy.deepcopy(model).unload()
        assert type(bare) is type(make_model(kind))
        assert not any(isinstance(m, ResiDualLayer) for m in bare.modules())
        assert not any("residual_" in n for n, _ in bare.named_parameters())
        assert torch.equal(outputs(bare), outputs(make_model(kind)))

    def test_merge_and_unmerge_round_trip(self, fitted_kind):
        _, model = fitted_kind
        model = copy.deepcopy(model)
        adapted = outputs(model)
        model.merge_adapter()
        assert model.base_model.readout.merged
        torch.testing.assert_close(outputs(model), adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        assert not model.base_model.readout.merged
        assert torch.equal(outputs(model), adapted)

    def test_only_the_scales_train_and_are_counted(self, fitted_kind):
        _, model = fitted_kind
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("residual_lambda" in n for n in trainable)
        count, total = model.get_nb_trainable_parameters()
        assert count == sum(p.numel() for p in trainable.values()) < total


def test_disable_adapter_gives_base_outputs_exactly(kind):
    def image_side(model):  # every output of the image path: a two-tower model's image features or vision tower
        if kind == "clip":
            return model.get_image_features(pixel_values=x)
        if kind == "blip":  # its forward needs text; the contrastive head reads the vision tower
            return model.vision_model(pixel_values=x)
        if kind == "open_clip":  # its forward needs text too
            return model.visual(x)
        return run_model(model, x)

    base = make_model(kind)
    x = images(4)
    with torch.no_grad():
        expected, plain = image_side(base), model_output(base, x)
    model = get_peft_model(base, ResiDualConfig(k=3))
    fit_residual_bases(model, loader(), progress=False)
    with torch.no_grad(), model.disable_adapter():
        got = image_side(model)
        assert torch.equal(model_output(model, x), plain)
    for key in ("last_hidden_state", "pooler_output", "image_embeds"):
        if getattr(expected, key, None) is not None:
            assert torch.equal(getattr(got, key), getattr(expected, key))
    with torch.no_grad():
        assert not torch.allclose(model_output(model, x), plain, atol=1e-3)
