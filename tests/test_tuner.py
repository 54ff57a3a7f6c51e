import copy
import importlib
import json

import pytest
import torch
from peft import AutoPeftModel, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file

import peft_residual
from peft_residual import ResiDualConfig, ResiDualInputError, decompose_units, fit_residual_bases

from .conftest import images, loader, make_model, model_output, run_model


def fitted(kind, config, seed=0, **model_overrides):
    model = get_peft_model(make_model(kind, seed, **model_overrides), copy.deepcopy(config))
    fit_residual_bases(model, loader(), progress=False)
    return model


def unwrap(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _units_float64(model, x):
    """Raw residual units at CLS in float64 from hooks on the named modules of each library (HF, timm, open_clip),
    and the final norm, projection weight and bias and head count."""
    base = model.base_model.model
    library = type(base).__module__.split(".")[0]
    tower = getattr(base, "vision_model", getattr(base, "visual", base))
    if library == "timm":
        layers = tower.blocks
        emb_module, norm = (
            tower.norm_pre,
            unwrap(tower.fc_norm if hasattr(unwrap(tower.fc_norm), "eps") else tower.norm),
        )
        parts = [(b.attn.proj, b.ls2, getattr(unwrap(b.ls1), "gamma", None)) for b in layers]
        projection = unwrap(tower.head) if hasattr(unwrap(tower.head), "weight") else None
        n_heads = layers[0].attn.num_heads
    elif library == "open_clip":
        layers = tower.transformer.resblocks
        emb_module, norm = tower.ln_pre, unwrap(tower.ln_post)
        parts = [(b.attn, b.ls_2, getattr(unwrap(b.ls_1), "gamma", None)) for b in layers]
        projection = None
        n_heads = unwrap(layers[0].attn).num_heads
    else:
        is_clip = hasattr(tower, "pre_layrnorm")
        is_vit = hasattr(tower, "pooler") and hasattr(tower, "layers")  # ViT: like DINOv2 without layer scale
        layers = tower.encoder.layers if is_clip else tower.layers if is_vit else tower.encoder.layer
        emb_module = tower.pre_layrnorm if is_clip else tower.embeddings
        norm = unwrap(tower.post_layernorm if is_clip else tower.layernorm)
        parts = [
            (
                layer.self_attn.out_proj if is_clip else layer.attention.o_proj,
                layer.mlp if is_clip or is_vit else layer.layer_scale2,
                None if is_clip or is_vit else layer.layer_scale1.lambda1,
            )
            for layer in layers
        ]
        projection = unwrap(base.visual_projection) if hasattr(base, "visual_projection") else None
        n_heads = base.config.num_attention_heads
    captured = {}

    def save(name, from_input):
        def hook(module, args, output=None):
            captured[name] = (args[0] if from_input else output).double()  # every token

        return hook

    modules = [(unwrap(emb_module), "emb", False)]
    for i, (attention_out, mlp_out, _) in enumerate(parts):
        modules += [(unwrap(attention_out), f"z{i}", True), (unwrap(mlp_out), f"m{i}", False)]
    handles = [
        m.register_forward_pre_hook(save(n, True)) if inp else m.register_forward_hook(save(n, False))
        for m, n, inp in modules
    ]
    with torch.no_grad(), model.disable_adapter():
        model_output(model, x)
    for h in handles:
        h.remove()

    raw = {"emb": captured["emb"][:, 0]}
    for i, (attention_out, _, layer_scale) in enumerate(parts):
        out_proj = unwrap(attention_out)
        if library == "open_clip":  # nn.MultiheadAttention: its heads at CLS, from its input and packed weights
            attention, tokens = out_proj, captured[f"z{i}"]
            q, k, v = (
                tokens @ w.double().T + b.double()
                for w, b in zip(attention.in_proj_weight.chunk(3), attention.in_proj_bias.chunk(3), strict=True)
            )
            d = q.shape[-1] // n_heads
            heads = []
            for h in range(n_heads):
                part = slice(h * d, (h + 1) * d)
                weights = torch.softmax(q[:, :1, part] @ k[:, :, part].transpose(1, 2) / d**0.5, dim=-1)
                heads.append((weights @ v[:, :, part])[:, 0])
            captured[f"z{i}"] = torch.cat(heads, -1)[:, None]
            out_proj = attention.out_proj
        w, b = out_proj.weight.double(), out_proj.bias.double()
        d = w.shape[1] // n_heads
        for h in range(n_heads):
            u = captured[f"z{i}"][:, 0, h * d : (h + 1) * d] @ w[:, h * d : (h + 1) * d].T + b / n_heads
            raw[f"layer{i}.head{h}"] = u if layer_scale is None else u * layer_scale.double()
        raw[f"layer{i}.mlp"] = captured[f"m{i}"][:, 0]
    if library == "open_clip" and tower.proj is not None:
        return raw, norm, tower.proj.double().T, None, n_heads
    weight, bias = (None, None) if projection is None else (projection.weight.double(), projection.bias)
    return raw, norm, weight, None if bias is None else bias.double(), n_heads


def reference_float64(model, x):
    """ResiDual output recomputed in float64 from hooks, raw weights and the adapter's stored bases and scales."""
    tuner = model.base_model
    config = tuner.peft_config["default"]
    raw, norm, projection, projection_bias, n_heads = _units_float64(model, x)
    n_layers = (len(raw) - 1) // (n_heads + 1)
    r = sum(raw.values())
    std = (r.var(-1, unbiased=False) + norm.eps).sqrt()
    blocks = 2 * n_layers + 1
    direct = {}
    for name, u in raw.items():
        share = 1 / (blocks * n_heads) if ".head" in name else 1 / blocks
        centre = share * r.mean(-1, keepdim=True) if config.ln_mean == "shared" else u.mean(-1, keepdim=True)
        c = norm.weight.double() * (u - centre) / std[:, None] + share * norm.bias.double()
        if projection is not None:
            c = c @ projection.T
            if projection_bias is not None:
                c = c + share * projection_bias
        direct["embedding" if name == "emb" else name] = c

    state = {}
    for layer in tuner.readout.layers_of("default"):
        k = layer.residual_rank["default"] if layer.is_transformed("default") else None
        start = 0
        for unit, name in enumerate(layer.unit_names):
            mean = layer.output_space("default")[0][unit].double()
            if k is None:
                state[name] = (mean, None, None)
                continue
            stop = start + int(k[unit])
            basis = layer.output_space("default")[1][start:stop].double()
            lam = layer.residual_lambda["default"].detach().double()
            lam = lam[unit].expand(stop - start) if config.scale_per == "unit" else lam[start:stop]
            state[name] = (mean, basis, lam)
            start = stop
    out = torch.zeros_like(direct["embedding"])
    for name, c in direct.items():
        mean, basis, lam = state.get(name, (None, None, None))
        if basis is not None:
            centred = c - mean if config.centre else c
            out += (centred @ basis.T * lam) @ basis
            if config.remainder == "keep":
                out += centred - (centred @ basis.T) @ basis
        elif config.rest == "sum":
            out += c
        elif config.rest == "mean":
            out += mean
    return out


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
]
IDS = [
    "k4", "residual", "residual_star", "coarse", "mean_keep", "k4_unit_mean", "residual_unit_mean", "uncentred",
    "mlps_only",
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


def test_registration_survives_reimport_and_reload():
    importlib.reload(peft_residual.compat)
    importlib.reload(peft_residual.tuner)
    importlib.reload(peft_residual)
    assert PeftType("RESIDUAL") is PeftType.RESIDUAL
    assert list(PeftType).count(PeftType.RESIDUAL) == 1
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.RESIDUAL] is peft_residual.ResiDualModel
    model = get_peft_model(make_model("clip_vision"), peft_residual.ResiDualConfig(k=2))
    assert isinstance(model.base_model, peft_residual.ResiDualModel)


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "at least 1"),
        ({"k": 1.5}, r"in \(0, 1\)"),
        ({"k": "64"}, "must be an int"),
        ({"units": "embedding"}, "units must be one of"),
        ({"rest": "drop"}, "rest must be one of"),
        ({"lambda_init": "zeros"}, "lambda_init must be one of"),
        ({"remainder": "both"}, "remainder must be one of"),
        ({"layers": []}, "non-empty list"),
    ],
)
def test_malformed_config_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResiDualConfig(**kwargs)


def test_layers_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        get_peft_model(make_model("clip_vision"), ResiDualConfig(k=2, layers=[5]))


def test_malformed_saved_config_is_a_clear_error(tmp_path):
    model = fitted("clip_vision", ResiDualConfig(k=2))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["rest"] = "everything"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rest must be one of"):
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


@pytest.mark.parametrize(
    "first",
    [pytest.param("peft_residual", marks=pytest.mark.slow), "peft_residual.training.trainer", "peft_residual.cli"],
)
def test_any_import_order_registers_the_method_before_peft_is_used(first):
    import subprocess
    import sys

    probe = (
        f"import {first}, sys\n"
        "assert 'peft' not in sys.modules or 'RESIDUAL' in __import__('peft').PeftType.__members__\n"
        "assert not any('peft_residual' in type(finder).__module__ for finder in sys.meta_path)\n"
        "from peft import PeftConfig, PeftModel, PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "print(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RESIDUAL].__name__, hasattr(PeftModel.push_to_hub, "
        "'_residual_original'))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ResiDualConfig", "True"]


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": ["layer9.head0"]}, "names layer9.head0, which this model does not have"),
        ({"heads": ["layer0.head7"]}, "heads 0..3"),
    ],
)
def test_heads_the_model_lacks_are_clear_errors(kwargs, message):
    with pytest.raises(ResiDualInputError, match=message):
        get_peft_model(make_model("dinov2"), ResiDualConfig(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"heads": ["head3"]}, "names like 'layer11.head3'"), ({"heads": ["layer0.head1"], "layers": [0]}, "not both")],
)
def test_malformed_head_selections_are_clear_errors(kwargs, message):
    with pytest.raises(ResiDualInputError, match=message):
        ResiDualConfig(**kwargs)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["clip_vision_projection", "dinov2", "clip_vision", "vit", "open_clip", "timm"])
def test_forward_from_raw_pieces_equals_the_output_space_path(kind, config, monkeypatch):
    """A frozen forward computes scores from the raw pieces (head kernels, one weighted sum through the norm); a
    forward that needs gradients for the readout's weights takes the output-space path. They agree."""
    import peft_residual.tuner.layer as layer_module

    model = fitted(kind, config)
    x = images(4, seed=8)
    calls = []
    fast = layer_module.adapt_from_pieces
    monkeypatch.setattr(layer_module, "adapt_from_pieces", lambda *a: calls.append(1) or fast(*a))
    with torch.no_grad():
        from_pieces = model_output(model, x)
    assert calls == [1]
    norm = model.base_model.arch.final_norm
    norm.weight.requires_grad_(True)
    exact = model_output(model, x)
    assert calls == [1]  # the trainable norm weight sent this forward down the output-space path
    assert exact.requires_grad
    torch.testing.assert_close(from_pieces, exact.detach(), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["clip_vision_projection", "dinov2"])
def test_merged_adapter_matches_independent_float64_on_both_paths(kind, config):
    """merge_adapter() snapshots the scales and folds each MLP's into a dense map where that pays (k > dim / 2); the
    frozen and the output-space forward through the fold still equal the float64 oracle."""
    model = fitted(kind, config)
    x = images(5, seed=7)
    reference = reference_float64(model, x)
    model.merge_adapter()
    merged = model.base_model.readout.residual_merged["default"]
    # all components of every MLP: folded into dense maps; a few (k=3 of 32 dims): the factored readout is cheaper
    assert merged.dense_mlps == ("mlps" in config.units and config.k is None)
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
