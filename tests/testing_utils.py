"""Helpers shared by test files: a fitted adapter, the independent float64 oracle of its output, and the CLI run
in this process."""

import copy

import torch
from peft import get_peft_model

from peft_residual import fit_residual_bases
from peft_residual.cli import main

from .conftest import loader, make_model, model_output


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
        start = scale = 0
        for unit, name in enumerate(layer.unit_names):
            mean = layer.output_space("default")[0][unit].double()
            if k is None or int(k[unit]) == 0:  # not transformed (a head left out by `heads`): `rest` applies
                state[name] = (mean, None, None)
                continue
            stop = start + int(k[unit])
            basis = layer.output_space("default")[1][start:stop].double()
            lam = layer.residual_lambda["default"].detach().double()  # one scale per transformed unit, or component
            lam = lam[scale].expand(stop - start) if config.scale_per == "unit" else lam[start:stop]
            state[name] = (mean, basis, lam)
            start, scale = stop, scale + 1
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


def run_main(capfd, *args) -> tuple[int, str, str]:
    """The CLI in this process (sparing a Python start per call): exit code, stdout, stderr."""
    capfd.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err
