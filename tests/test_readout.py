"""The adapted forward: equal to an independent float64 oracle on every path (frozen, output-space, merged),
what it transforms and what it leaves alone, and what it trains."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_residual import ResiDualConfig, decompose_units, fit_residual_bases

from .conftest import images, loader, make_model, model_output
from .testing_utils import fitted, reference_float64

CONFIGS = [
    ResiDualConfig(k=4),
    ResiDualConfig.residual(),
    ResiDualConfig.residual_star(),
    ResiDualConfig.coarse(),
    ResiDualConfig(k=3, units="heads+mlps", layers=[1], rest="mean", remainder="keep", lambda_init="eigen"),
    ResiDualConfig(k=4, ln_mean="unit"),
    ResiDualConfig.residual(ln_mean="unit"),
    ResiDualConfig(k=0.9, centre=False, rest="sum", remainder="keep"),
    ResiDualConfig(k=3, units="mlps", rest="mean"),
    ResiDualConfig(k=4, heads=["layer1.head0", "layer0.head2"], rest="mean"),
    ResiDualConfig.coarse(heads=["layer1.head1", "layer0.head0"], rest="sum"),
]


IDS = [
    "k4", "residual", "residual_star", "coarse", "mean_keep", "k4_unit_mean", "residual_unit_mean", "uncentred",
    "mlps_only", "some_heads_mean", "coarse_some_heads",
]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["clip_vision_projection", "dinov2", "clip_vision", "vit", "open_clip", "timm"])
def test_adapted_output_matches_independent_float64(kind, config):
    model = fitted(kind, config)
    x = images(5, seed=7)
    with torch.no_grad():
        out = model_output(model, x)
    torch.testing.assert_close(out.double(), reference_float64(model, x), rtol=1e-4, atol=1e-5)


def test_clip_two_tower_adapts_image_features_only():
    base = make_model("clip")
    text_before = {k: v.clone() for k, v in base.text_model.state_dict().items()}
    model = get_peft_model(base, ResiDualConfig(k=3))
    assert not any("text_model" in name for name in model.base_model.peft_config["default"].target_modules)
    fit_residual_bases(model, loader(), progress=False)
    x = images(4)
    with torch.no_grad():
        adapted = model.get_image_features(pixel_values=x).pooler_output
        with model.disable_adapter():
            plain = model.get_image_features(pixel_values=x).pooler_output
    assert not torch.allclose(adapted, plain, atol=1e-3)
    for key, value in base.text_model.state_dict().items():
        assert torch.equal(value, text_before[key])


def test_dinov2_replaces_only_the_cls_token():
    model = fitted("dinov2", ResiDualConfig(k=3))
    x = images(3)
    with torch.no_grad():
        adapted = model(pixel_values=x)
        with model.disable_adapter():
            plain = model(pixel_values=x)
    assert torch.equal(adapted.last_hidden_state[:, 1:], plain.last_hidden_state[:, 1:])
    assert torch.equal(adapted.last_hidden_state[:, 0], adapted.pooler_output)


def test_forward_before_fitting_is_a_clear_error():
    model = get_peft_model(make_model("clip_vision_projection"), ResiDualConfig(k=3))
    with pytest.raises(RuntimeError, match="fit_residual_bases"):
        model(pixel_values=images(2))


def test_only_lambdas_are_trainable():
    model = fitted("clip_vision_projection", ResiDualConfig(k=3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("residual_lambda.default") for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == 2 * 4 * 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_transforms_in_float32(dtype):
    model = fitted("clip_vision_projection", ResiDualConfig(k=3))
    x = images(4)
    model.to(dtype)
    assert model.base_model.readout.lambdas("default").dtype == torch.float32
    with torch.no_grad():
        out = model(pixel_values=x.to(dtype)).image_embeds
    assert out.dtype == dtype
    reference = reference_float64(model, x.to(dtype))
    # The oracle reads the same half-precision backbone pieces and does the readout in float64, so a readout in
    # float32 differs from it by the final rounding to ``dtype`` alone: at most half an ulp, plus float32 noise. A
    # readout computed in ``dtype`` itself misses this by far (its products and sums round at every step).
    ulp_half = 0.5 * torch.finfo(dtype).eps * reference.abs()
    error = (out.double() - reference).abs()
    assert bool((error <= ulp_half * 1.01 + 1e-6 * float(reference.abs().max())).all()), float((error / ulp_half).max())


@pytest.mark.parametrize("kind", ["clip_vision_projection", "dinov2"])
def test_coarse_scales_each_raw_head_and_drops_the_rest(kind):
    """The paper's coarse baseline: the output is sum_h lambda_h * u_h over the raw head contributions."""
    model = fitted(kind, ResiDualConfig.coarse())
    x = images(5, seed=3)
    units = decompose_units(model.get_base_model(), x)
    lambdas = {}
    for layer in model.base_model.readout.transformed_layers("default"):
        lambdas.update(zip(layer.unit_names, layer.residual_lambda["default"].detach().double(), strict=True))
    expected = sum(
        lambdas[name] * units.contributions[:, i].double() for i, name in enumerate(units.names) if name in lambdas
    )
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, x).double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rest", ["zero", "mean", "sum"])
def test_selected_heads_alone_are_transformed(tmp_path, rest):
    """With heads=..., lambda = 1 and raw units, the output is the selected heads plus the rest as `rest` says."""
    chosen = ["layer1.head2", "layer0.head1", "layer1.head0"]
    config = ResiDualConfig(heads=chosen, k=None, centre=False, lambda_init="ones", scale_per="unit", rest=rest)
    model = fitted("dinov2", config)
    assert model.peft_config["default"].heads == ["layer0.head1", "layer1.head0", "layer1.head2"]
    assert model.get_nb_trainable_parameters()[0] == 3  # one scale per selected head
    reference = decompose_units(model.get_base_model(), torch.cat([b["pixel_values"] for b in loader()])).contributions
    x = images(4, seed=5)
    units = decompose_units(model.get_base_model(), x)
    others = [i for i, name in enumerate(units.names) if name not in chosen]
    expected = sum(units.contributions[:, units.names.index(name)].double() for name in chosen)
    if rest == "mean":
        expected = expected + reference[:, others].double().mean(0).sum(0)
    elif rest == "sum":
        expected = expected + units.contributions[:, others].double().sum(1)
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, x).double(), expected, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make_model("dinov2"), tmp_path)
    with torch.no_grad():
        assert torch.equal(model_output(again, x), model_output(model, x))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["clip_vision_projection", "dinov2", "clip_vision", "vit", "open_clip", "timm"])
def test_folded_forward_equals_the_output_space_path(kind, config, monkeypatch):
    """A frozen forward folds each piece into the output as it arrives (:mod:`peft_residual.tuner.fold`); a forward
    that needs gradients for the readout's weights keeps the pieces and takes the output-space path. They agree."""
    from peft_residual.tuner.fold import Fold

    model = fitted(kind, config)
    x = images(4, seed=8)
    calls = []
    fold_output = Fold.output
    monkeypatch.setattr(Fold, "output", lambda *a: calls.append(1) or fold_output(*a))
    with torch.no_grad():
        folded = model_output(model, x)
    assert calls == [1]
    norm = model.base_model.arch.final_norm
    norm.weight.requires_grad_(True)
    exact = model_output(model, x)
    assert calls == [1]  # the trainable norm weight sent this forward down the output-space path
    assert exact.requires_grad
    torch.testing.assert_close(folded, exact.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["clip_vision_projection", "dinov2"])
def test_merged_adapter_matches_independent_float64_on_both_paths(kind, config):
    """merge_adapter() snapshots the scales and folds them into one ``[in, output_dim]`` map per piece; the frozen
    forward through those maps and the output-space forward with the snapshot still equal the float64 oracle."""
    model = fitted(kind, config)
    x = images(5, seed=7)
    reference = reference_float64(model, x)
    model.merge_adapter()
    merged = model.base_model.readout.residual_fold["default"]
    assert merged.merged and merged.maps and merged.lambdas is not None
    output_dim = reference.shape[1]
    assert all(piece_map.weight.shape[1] == output_dim for piece_map in merged.maps.values())
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, x).double(), reference, rtol=1e-4, atol=1e-5)
    model.base_model.arch.final_norm.weight.requires_grad_(True)  # the output-space path
    torch.testing.assert_close(model_output(model, x).detach().double(), reference, rtol=1e-4, atol=1e-5)


def test_merged_output_keeps_the_merged_scales_until_unmerged():
    model = fitted("dinov2", ResiDualConfig.residual())
    x = images(3, seed=2)
    with torch.no_grad():
        before = model_output(model, x)
        model.merge_adapter()
        assert model.base_model.readout.merged
        mlp = next(layer for layer in model.base_model.unit_layers() if layer.kind == "mlps")
        mlp.residual_lambda["default"].mul_(3.0)  # as PEFT's merges: no effect until unmerged
        torch.testing.assert_close(model_output(model, x), before, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        changed = model_output(model, x)
        assert (changed - before).abs().max() > 1e-3
        model.merge_adapter()
        torch.testing.assert_close(model_output(model, x), changed, rtol=1e-5, atol=1e-5)
        with pytest.warns(UserWarning, match="Unmerging the model first"):
            model.set_adapter("default")
        assert not model.base_model.readout.merged
        with pytest.warns(UserWarning, match="Already unmerged"):
            model.unmerge_adapter()


@pytest.mark.parametrize("hook", ["forward", "full backward"])
@pytest.mark.parametrize("merge", [False, True], ids=["live", "merged"])
def test_hooks_on_the_final_norm_see_the_base_output(merge, hook):
    """The adapted output goes into a new tensor, never into the final norm's: a forward hook registered before
    get_peft_model (to grab features) keeps the base model's output, and with a full backward hook (whose autograd
    Function allows no in-place write into that output) the adapted forward still trains."""
    base, bare = make_model("dinov2"), make_model("dinov2")
    seen = []
    if hook == "forward":
        base.layernorm.register_forward_hook(lambda module, args, output: seen.append(output))
    else:
        base.layernorm.register_full_backward_hook(lambda module, grad_input, grad_output: seen.append(grad_output))
    model = get_peft_model(base, ResiDualConfig.preset("residual"))
    fit_residual_bases(model, loader(n=64), progress=False)
    if merge:
        model.merge_adapter()
    x = images(3, seed=4).requires_grad_(True)
    adapted = model(pixel_values=x).last_hidden_state
    with torch.no_grad():
        expected = bare(pixel_values=x).last_hidden_state
    assert (adapted[:, 0] - expected[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(adapted[:, 1:].detach(), expected[:, 1:], rtol=0, atol=0)
    if hook == "forward":
        torch.testing.assert_close(seen[-1].detach(), expected, rtol=0, atol=0)
    adapted[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert hook == "forward" or seen  # the backward hook ran


def test_a_merge_inside_inference_mode_leaves_a_model_that_trains():
    model = fitted("dinov2", ResiDualConfig(k=4))
    with torch.inference_mode():
        model.merge_adapter()
    x = images(2, seed=5).requires_grad_(True)
    model_output(model, x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
