"""PEFT's generic tuner contract, run against ResiDual on tiny CLIP and DINOv2 models.

These are our own versions of the cases of PEFT's ``PeftCommonTester`` that apply to a readout adapter: save and
load (all and selected adapters), multiple adapters, set/disable/delete adapter, unload, deepcopy, pickling,
training only the adapter, inference mode, and the merge calls (merging folds the readout; merge_and_unload fails
clearly). The README lists the cases that do not apply and why.
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

from peft_residual import (
    PRESETS,
    Classifier,
    ResiDualConfig,
    ResiDualInputError,
    embed_images,
    fit_residual_bases,
    train_residual,
)
from peft_residual.tuner import ResiDualLayer

from .conftest import images, loader, make_model

LIFECYCLE_KINDS = ["clip_vision_projection", "dinov2", "open_clip", "timm"]

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
    for kind in LIFECYCLE_KINDS:
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
@pytest.mark.parametrize("kind", LIFECYCLE_KINDS)
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
    count, hooks = layers(first), hook_count(first)
    assert hooks == 1  # the final norm's, which notes the residual a folding pass reads its statistics from
    bare = first.unload()
    assert hook_count(bare) == 0 and layers(bare) == 0
    again = get_peft_model(bare, ResiDualConfig(k=2))
    assert layers(again) == count and hook_count(again) == hooks
    fit_residual_bases(again, loader(), progress=False)
    assert output(again).shape == (3, 24)


@pytest.mark.parametrize("kind", LIFECYCLE_KINDS)
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


def test_merge_folds_the_readout_and_merge_and_unload_fails_clearly(fitted_models):
    model = fresh(fitted_models, "dinov2", "residual")
    adapted = output(model)
    with pytest.warns(UserWarning, match="Nothing to do"):
        model.unmerge_adapter()
    model.merge_adapter()
    torch.testing.assert_close(output(model), adapted, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    with pytest.raises(ResiDualInputError, match="unmerge_adapter"):
        train_residual(model, Classifier(torch.randn(3, 32), 100.0, ["a", "b", "c"]), [], eval_dataset=[])
    with pytest.raises(NotImplementedError, match="cannot be merged into the base weights"):
        model.merge_and_unload()
    torch.testing.assert_close(output(model), adapted, rtol=1e-5, atol=1e-5)  # still adapted, still merged
    model.unmerge_adapter()
    assert not model.base_model.readout.merged
    torch.testing.assert_close(output(model), adapted, rtol=0, atol=0)


def test_a_safe_merge_of_broken_scales_refuses_and_leaves_the_adapter_live(fitted_models):
    model = fresh(fitted_models, "dinov2", "residual")
    readout = model.base_model.readout
    readout.set_scales(
        "default",
        torch.cat([s.detach() for s in readout.scales("default")]).index_fill(0, torch.tensor([3]), float("inf")),
    )
    with pytest.raises(ValueError, match="gives non-finite values; its scales are broken"):
        model.base_model.merge_adapter(safe_merge=True)
    assert not readout.merged


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
    with pytest.warns(UserWarning, match="replaced scales that differed from their initial values"):
        fit_residual_bases(model, loader(), progress=False)
    assert model.peft_config["default"].training_summary is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_residual_bases(model, loader(), progress=False)  # untrained: no warning


def test_other_image_size_warns_once(fitted_models):
    model = fresh(fitted_models, "dinov2")
    with pytest.warns(UserWarning, match="fitted on images of 17 tokens, but this input gives 5") as caught:
        output(model, torch.randn(2, 3, 16, 16))
    assert caught[0].filename == __file__  # the caller's line, through PEFT's and torch's frames
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output(model)  # the fitted size: silent


def test_another_pixel_size_with_the_same_tokens_warns(fitted_models):
    """35 px gives the fitted 32 px's 4x4 patches of 8 px: the model crops silently, the adapter says so."""
    model = fresh(fitted_models, "dinov2")
    cropped = torch.randn(2, 3, 35, 35)
    with pytest.warns(UserWarning, match="fitted on 32x32 px images, but this input is 35x35 px: the same 4x4 "
                      "patches of 8 px") as caught:  # fmt: skip
        adapted = output(model, cropped)
    assert caught[0].filename == __file__ and len(caught) == 1  # not the token warning as well
    torch.testing.assert_close(adapted, output(model, cropped[..., :32, :32]), rtol=0, atol=0)  # what it reads


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
def test_config_fields_changed_after_construction_are_checked_when_set(mutation, message):
    """A config is checked when it is created and when a field is set, so a bad value never reaches a fit."""
    config = ResiDualConfig(k=2)
    for key, value in mutation.items():
        with pytest.raises(ResiDualInputError, match=message):
            setattr(config, key, value)
    get_peft_model(make_model("clip_vision"), config)  # the refused value was not kept
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=2))
    for key, value in mutation.items():
        with pytest.raises(ResiDualInputError, match=message):
            setattr(model.peft_config["default"], key, value)
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
    assert not list(tmp_path.glob(".residual-*"))  # no staging directory, no marker


def test_killed_save_leaves_the_old_or_the_new_adapter_or_a_refused_directory(tmp_path):
    """A subprocess saves two different adapters over one directory in a loop; kill -9 it at random moments. Each
    kill leaves version 1, version 2, or a directory refused as an interrupted save, never a mixed pair; both
    versions turn up (a save that never replaced the old adapter would always leave version 1), and the next save
    clears what the killed ones left."""
    target = tmp_path / "adapter"
    command = [sys.executable, str(SCRIPTS / "save_loop.py"), str(target)]
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for trial in range(16):
        if trial >= 4 and {1, 2} <= seen:
            break
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout.readline().strip() == "saving"
        time.sleep(0.05 + 0.4 * float(torch.rand((), generator=generator)))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        try:
            loaded = PeftModel.from_pretrained(make_model("dinov2"), target)
        except ResiDualInputError as error:
            assert "interrupted save" in str(error)
            seen.add("interrupted")
            continue
        lambdas, version = loaded.base_model.readout.lambdas("default"), loaded.peft_config["default"].seed
        assert version in (1, 2)
        assert torch.equal(lambdas, torch.full_like(lambdas, float(version))), "config and tensors of one save"
        seen.add(version)
    assert {1, 2} <= seen, f"only {seen} was ever found after a kill"
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=3))
    fit_residual_bases(model, loader(), progress=False)
    model.save_pretrained(target)
    assert not list(target.glob(".residual-*")) and isinstance(
        PeftModel.from_pretrained(make_model("dinov2"), target), PeftModel
    )
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_save_follows_a_symlink_and_keeps_the_users_card(fitted_models, tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    (real / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nMy own notes.\n")
    (real / "notes.txt").write_text("keep me")
    model = fresh(fitted_models)
    for _ in range(2):  # the second save refreshes the ResiDual section instead of adding another
        model.save_pretrained(link)
    assert link.is_symlink() and (real / "adapter_model.safetensors").is_file()
    assert (real / "notes.txt").read_text() == "keep me"
    card = (real / "README.md").read_text()
    assert "My own notes." in card and "license: mit" in card and "- mine" in card and "- residual" in card
    assert card.count("# ResiDual adapter for") == 1 and card.index("My own notes.") < card.index("# ResiDual")
    torch.testing.assert_close(output(PeftModel.from_pretrained(make_model("dinov2"), link)), output(model))


def test_a_damaged_or_incomplete_adapter_directory_is_refused_naming_the_file(fitted_models, tmp_path):
    from safetensors.torch import load_file, save_file

    fresh(fitted_models).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "residual_lambda" in k)
    tensors[key][0] = float("nan")  # as flipped exponent bits would
    save_file(tensors, weights)
    with pytest.raises(ResiDualInputError, match=rf"{weights} is damaged: tensor .*residual_lambda"):
        PeftModel.from_pretrained(make_model("dinov2"), tmp_path)
    weights.unlink()
    with pytest.raises(ResiDualInputError, match=r"has an adapter config but no adapter_model\.safetensors"):
        PeftModel.from_pretrained(make_model("dinov2"), tmp_path)
    fresh(fitted_models).save_pretrained(tmp_path)
    (tmp_path / ".residual-save-in-progress").write_text("")
    with pytest.raises(ResiDualInputError, match="interrupted save"):
        PeftModel.from_pretrained(make_model("dinov2"), tmp_path)


def test_save_pretrained_writes_the_residual_card(fitted_models, tmp_path):
    fresh(fitted_models, "dinov2", "residual").save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "# ResiDual adapter for" in card
    assert "import peft_residual" in card and "Fitted at: 32x32 px" in card
    assert "## Training procedure" not in card  # not PEFT's generic template


@pytest.mark.slow
@pytest.mark.parametrize("where", ["a mount point", "a directory under a read-only parent"])
def test_save_works_on_a_mount_point_and_under_a_read_only_parent(tmp_path, where):
    """For real, in a private mount namespace (root's `unshare -m`): a tmpfs mounted on the target, as a container
    volume is; for the second case the parent is another tmpfs, remounted read-only after the target's mount."""
    parent, target = tmp_path / "parent", tmp_path / "parent" / "adapter"
    parent.mkdir()
    script = f"{sys.executable} {SCRIPTS / 'save_into.py'} {target}"
    if where == "a mount point":
        setup = f"mkdir {target} && mount -t tmpfs none {target}"
    else:
        setup = f"mount -t tmpfs none {parent} && mkdir {target} && mount -t tmpfs none {target} && "
        setup += f"mount -o remount,ro {parent} && ! touch {parent}/probe 2>/dev/null"
    result = subprocess.run(["unshare", "-m", "sh", "-c", f"{setup} && {script}"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "saved", result.stderr[-2000:]


def test_layers_carry_peft_layer_attributes_and_autocast_adapter_dtype_is_honoured():
    model = get_peft_model(make_model("clip_vision_projection"), ResiDualConfig(k=2))
    layers = [m for m in model.modules() if isinstance(m, ResiDualLayer)]
    for layer in layers:
        base = layer.get_base_layer()
        expected = (base.in_features, base.out_features) if isinstance(base, torch.nn.Linear) else (32, 32)
        assert (layer.in_features, layer.out_features) == expected, type(base).__name__
    assert any(isinstance(layer.get_base_layer(), torch.nn.Linear) for layer in layers)
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):  # PEFT's rule: upcast half by default
        half = get_peft_model(
            make_model("dinov2").to(torch.bfloat16), ResiDualConfig(k=2), autocast_adapter_dtype=autocast
        )
        fit_residual_bases(half, [{"pixel_values": images(32).to(torch.bfloat16)}], progress=False)
        scales = [p for name, p in half.named_parameters() if "residual_lambda" in name]
        assert scales and all(p.dtype == dtype for p in scales), (autocast, {p.dtype for p in scales})
