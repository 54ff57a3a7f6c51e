"""PEFT's generic tuner contract, run against ResiDual on tiny CLIP and DINOv2 models.

These are our own versions of the cases of PEFT's ``PeftCommonTester`` that apply to a readout adapter: save and
load (all and selected adapters), multiple adapters, set/disable/delete adapter, unload, deepcopy, pickling,
training only the adapter, inference mode, and the merge calls (which must fail clearly). The README lists the
cases that do not apply and why.
"""

import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

from peft_residual import PRESETS, ResiDualConfig, ResiDualInputError, embed_images, fit_residual_bases
from peft_residual.tuner import ResiDualLayer

from .conftest import images, loader, make_model

CONFIGS = {
    **{
        name: ResiDualConfig.preset(name, k=3) if name == "residual*" else ResiDualConfig.preset(name)
        for name in PRESETS
    },
    "k3-mean": ResiDualConfig(k=3, rest="mean"),
    "layer1-mean-keep": ResiDualConfig(k=2, units="heads+mlps", layers=[1], rest="mean", remainder="keep"),
}
SCRIPTS = Path(__file__).resolve().parent / "scripts"


@pytest.fixture(scope="module")
def fitted_models():
    """One fitted adapter per (architecture, config), built once; tests take deep copies."""
    models = {}
    for kind in ("clip_vision_projection", "dinov2"):
        for name, config in CONFIGS.items():
            model = get_peft_model(make_model(kind), copy.deepcopy(config))
            fit_residual_bases(model, loader(), progress=False)
            models[kind, name] = model
    return models


def fresh(fitted_models, kind="dinov2", name="k3-mean"):
    return copy.deepcopy(fitted_models[kind, name])


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def output(model, x=None):
    with torch.no_grad():
        return embed_images(model, images(3) if x is None else x)


def base_output(kind, x=None):
    return output(make_model(kind), x)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["clip_vision_projection", "dinov2"])
def test_unload_returns_the_bare_model_with_no_hooks(fitted_models, kind, name):
    model = fresh(fitted_models, kind, name)
    assert not torch.allclose(output(model), base_output(kind), atol=1e-4)
    bare = model.unload()
    assert type(bare) is type(make_model(kind))
    assert not any(isinstance(m, ResiDualLayer) for m in bare.modules())
    assert hook_count(bare) == 0
    assert not any("residual_" in n for n, _ in bare.named_parameters()) and not hasattr(bare, "peft_config")
    torch.testing.assert_close(output(bare), base_output(kind), rtol=0, atol=0)


def test_wrapping_again_never_accumulates_hooks_or_layers():
    base = make_model("clip_vision_projection")
    layers = lambda m: sum(isinstance(x, ResiDualLayer) for x in m.modules())  # noqa: E731
    first = get_peft_model(base, ResiDualConfig(k=2))
    count = layers(first)
    assert hook_count(first) == 0
    bare = first.unload()
    again = get_peft_model(bare, ResiDualConfig(k=2))
    assert layers(again) == count and hook_count(again) == 0
    fit_residual_bases(again, loader(), progress=False)
    assert output(again).shape == (3, 24)


@pytest.mark.parametrize("kind", ["clip_vision_projection", "dinov2"])
def test_deepcopy_and_pickle_give_equal_independent_models(fitted_models, kind):
    model = fresh(fitted_models, kind)
    expected = output(model)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(output(twin), expected, rtol=0, atol=0)
        with torch.no_grad():
            next(p for n, p in twin.named_parameters() if "residual_lambda" in n).mul_(3.0)
        assert not torch.allclose(output(twin), expected) and torch.equal(output(model), expected)
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole model pickles: no closures in hooks, no unpicklable state
    assert buffer.tell() > 0


def test_second_adapter_switch_save_selected_and_delete(fitted_models, tmp_path):
    model = fresh(fitted_models, "dinov2", "k3-mean")
    first = output(model)
    model.add_adapter("other", ResiDualConfig(k=2, seed=5))
    model.set_adapter("other")
    fit_residual_bases(model, loader(), progress=False)
    other = output(model)
    assert not torch.allclose(first, other)
    model.set_adapter("default")
    torch.testing.assert_close(output(model), first, rtol=0, atol=0)
    assert "other" in model.base_model.readout.residual_plan

    model.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "other" / "adapter_config.json").exists()
    model.save_pretrained(tmp_path / "only_other", selected_adapters=["other"])
    loaded = PeftModel.from_pretrained(make_model("dinov2"), tmp_path / "only_other" / "other", adapter_name="other")
    torch.testing.assert_close(output(loaded), other, rtol=0, atol=0)
    loaded.load_adapter(tmp_path / "both", adapter_name="default")
    loaded.set_adapter("default")
    torch.testing.assert_close(output(loaded), first, rtol=0, atol=0)

    model.delete_adapter("other")
    for layer in (m for m in model.modules() if isinstance(m, ResiDualLayer)):
        for attr in layer.adapter_layer_names + layer.other_param_names:
            assert "other" not in getattr(layer, attr), attr
    assert "other" not in model.peft_config
    torch.testing.assert_close(output(model), first, rtol=0, atol=0)


def test_deleting_the_last_adapter_passes_through_like_lora(fitted_models):
    model = fresh(fitted_models, "clip_vision_projection", "residual")
    model.delete_adapter("default")
    assert model.active_adapters == [] and not model.peft_config
    for layer in (m for m in model.modules() if isinstance(m, ResiDualLayer)):
        assert layer._all_available_adapter_names() == []
    # as with LoRA, the wrapped model passes through (PeftModel.forward itself needs an adapter config)
    inner = model.base_model.model
    torch.testing.assert_close(output(inner), base_output("clip_vision_projection"), rtol=0, atol=0)


def test_merge_calls_fail_clearly_and_unmerge_warns(fitted_models):
    model = fresh(fitted_models)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.warns(UserWarning, match="Nothing to do"):
        model.unmerge_adapter()
    assert output(model).shape == (3, 32)


def test_disable_adapter_gives_the_base_model_and_restores(fitted_models):
    model = fresh(fitted_models, "clip_vision_projection", "residual")
    adapted = output(model)
    with model.disable_adapter():
        torch.testing.assert_close(output(model), base_output("clip_vision_projection"), rtol=0, atol=0)
    torch.testing.assert_close(output(model), adapted, rtol=0, atol=0)


def test_only_the_scales_train_through_the_model(fitted_models):
    model = fresh(fitted_models, "dinov2", "residual")
    model.train()
    embed_images(model, images(4)).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("residual_lambda" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "residual_lambda" in n) < total


def test_state_dict_holds_only_adapter_tensors_and_inference_mode_loads_frozen(fitted_models, tmp_path):
    model = fresh(fitted_models, "dinov2", "residual*")
    state = get_peft_model_state_dict(model)
    assert state and all(".residual_" in key for key in state)
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(make_model("dinov2"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(make_model("dinov2"), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "residual_lambda" in n
    }


def test_saving_an_unfitted_adapter_is_an_error_and_writes_nothing(tmp_path):
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=2))
    with pytest.raises(RuntimeError, match="fit_residual_bases"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.iterdir())


def test_refitting_trained_scales_warns(fitted_models):
    model = fresh(fitted_models)
    model.peft_config["default"].training_summary = {"epochs": 3}
    with pytest.warns(UserWarning, match="resets its trained scales"):
        fit_residual_bases(model, loader(), progress=False)
    assert model.peft_config["default"].training_summary is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_residual_bases(model, loader(), progress=False)  # untrained: no warning


def test_other_image_size_warns_once(fitted_models):
    model = fresh(fitted_models, "dinov2")
    with pytest.warns(UserWarning, match="fitted on images of 17 tokens, but this input gives 5"):
        output(model, torch.randn(2, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output(model)  # the fitted size: silent


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        ({"layers": 5}, "layers must be a non-empty list"),
        ({"seed": 2**64}, r"seed must be an int in \[0, 2\*\*63\)"),
        ({"seed": False}, "seed must be an int"),
        ({"k": -2}, "at least 1"),
        ({"rest": "drop"}, "rest must be one of"),
    ],
)
def test_config_fields_changed_after_construction_are_checked_when_used(mutation, message):
    config = ResiDualConfig(k=2)
    for key, value in mutation.items():
        setattr(config, key, value)
    with pytest.raises(ResiDualInputError, match=message):
        get_peft_model(make_model("clip_vision"), config)
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=2))
    for key, value in mutation.items():
        setattr(model.peft_config["default"], key, value)
    with pytest.raises(ResiDualInputError, match=message):
        fit_residual_bases(model, loader(), progress=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text[: len(text) // 2], "is not valid JSON"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "rest"}), "lacks the ResiDual"),
    ],
)
def test_broken_adapter_config_is_an_error_naming_the_file(fitted_models, tmp_path, edit, message):
    fresh(fitted_models).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ResiDualInputError, match=rf"{path}.*{message}|{message}"):
        ResiDualConfig.from_pretrained(tmp_path)


def test_save_keeps_other_files_and_replaces_the_adapter(fitted_models, tmp_path):
    model = fresh(fitted_models)
    model.save_pretrained(tmp_path)
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "classifier.json").write_text("{}")
    (tmp_path / "training.json").write_text("{}")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "residual_lambda" in n).add_(1.0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "classifier" / "classifier.json").read_text() == "{}"
    assert (tmp_path / "training.json").exists()
    torch.testing.assert_close(output(PeftModel.from_pretrained(make_model("dinov2"), tmp_path)), output(model))
    assert not [p for p in tmp_path.parent.iterdir() if ".saving." in p.name]


def test_killed_save_leaves_the_old_or_the_new_adapter(tmp_path):
    """A subprocess saves two different adapters over one directory in a loop; kill -9 it at random moments. Both
    versions must turn up: a save that never replaced the old adapter would always leave version 1."""
    target = tmp_path / "adapter"
    command = [sys.executable, str(SCRIPTS / "save_loop.py"), str(target)]
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for trial in range(12):
        if trial >= 4 and seen == {1, 2}:
            break
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout.readline().strip() == "saving"
        time.sleep(0.05 + 0.4 * float(torch.rand((), generator=generator)))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        config = json.loads((target / "adapter_config.json").read_text())  # never empty or truncated
        lambdas = PeftModel.from_pretrained(make_model("dinov2"), target).base_model.readout.lambdas("default")
        version = config["seed"]
        assert version in (1, 2)
        assert torch.equal(lambdas, torch.full_like(lambdas, float(version))), "config and tensors of one save"
        seen.add(version)
    assert seen == {1, 2}, f"only version {seen} was ever found after a kill"
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter" and ".saving." not in p.name]


def test_save_pretrained_writes_the_residual_card(fitted_models, tmp_path):
    fresh(fitted_models, "dinov2", "residual").save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "# ResiDual adapter for" in card
    assert "import peft_residual" in card and "Fitted at: 32x32 px" in card
    assert "## Training procedure" not in card  # not PEFT's generic template
