import math

import pytest
import torch
from peft import get_peft_model

from peft_residual import ResiDualConfig, ResiDualInputError, decompose_units, fit_residual_bases
from peft_residual.moments import StreamingMoments

from .conftest import KINDS, images, loader, make_model


def _stacked_units(model, data, ln_mean="shared"):
    units = [decompose_units(model, batch["pixel_values"], ln_mean).contributions for batch in data]
    return torch.cat(units).double()


def test_streaming_moments_match_stacked_float64():
    data = torch.randn(100, 3, 5, dtype=torch.float64) * 10 + 1000  # a large mean stresses cancellation
    moments = StreamingMoments()
    for chunk in data.split(17):
        moments.update(chunk)
    torch.testing.assert_close(moments.mean, data.mean(0))
    for unit in range(3):
        torch.testing.assert_close(moments.covariance()[unit], torch.cov(data[:, unit].T))


@pytest.mark.parametrize("kind", KINDS)
def test_bases_match_svd_of_stacked_data(kind):
    data = loader(n=90, batch=32)
    model = get_peft_model(make_model(kind), ResiDualConfig(k=5, units="heads+mlps"))
    report = fit_residual_bases(model, data, progress=False)
    assert report.num_samples == 90
    stacked = _stacked_units(model, data)
    for layer in model.base_model.readout.layers_of("default"):
        mean, basis = layer.output_space("default")[:2]
        basis = basis.double().view(layer.num_units, 5, -1)
        for unit, name in enumerate(layer.unit_names):
            x = stacked[:, model.base_model.arch.unit_names.index(name)]
            torch.testing.assert_close(mean[unit].double(), x.mean(0), rtol=1e-5, atol=1e-6)
            _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
            # components agree up to sign
            dots = (basis[unit] * vh[:5]).sum(-1).abs()
            torch.testing.assert_close(dots, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-4)
            assert report.explained_variance[name] == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), 1e-6)


def test_variance_threshold_picks_smallest_k():
    data = loader(n=90, batch=30)
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=0.9))
    report = fit_residual_bases(model, data, progress=False)
    stacked = _stacked_units(model, data)
    for name, k in report.components.items():
        x = stacked[:, model.base_model.arch.unit_names.index(name)]
        s2 = torch.linalg.svdvals(x - x.mean(0)) ** 2
        ratios = torch.cumsum(s2, 0) / s2.sum()
        assert ratios[k - 1] >= 0.9 - 1e-9 and (k == 1 or ratios[k - 2] < 0.9)
        assert report.explained_variance[name] >= 0.9 - 1e-9


def test_k_above_head_rank_is_clamped_and_reported():
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=30))
    with pytest.warns(UserWarning, match="clamped"):
        report = fit_residual_bases(model, loader(n=64), progress=False)
    head_rank = 32 // 4 + 2  # head_dim + 1, plus the direction of the shared norm mean
    assert set(report.components.values()) == {head_rank}
    assert report.clamped["layer0.head0"] == (30, head_rank)
    assert report.num_scales == 2 * 4 * head_rank


def test_lambda_inits():
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=3, lambda_init="ones"))
    fit_residual_bases(model, loader(), progress=False)
    assert torch.equal(model.base_model.readout.lambdas("default"), torch.ones(2 * 4 * 3))
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=3, lambda_init="eigen"))
    report = fit_residual_bases(model, loader(), progress=False)
    lambdas = model.base_model.readout.lambdas("default").view(8, 3)
    torch.testing.assert_close(lambdas.mean(1), torch.ones(8))
    assert (lambdas[:, 0] >= lambdas[:, 1]).all() and report.num_scales == 24
    seeded = [get_peft_model(make_model("clip_vision"), ResiDualConfig(k=3, seed=s)) for s in (5, 5, 6)]
    lams = []
    for m in seeded:
        fit_residual_bases(m, loader(), progress=False)
        lams.append(m.base_model.readout.lambdas("default"))
    assert torch.equal(lams[0], lams[1]) and not torch.equal(lams[0], lams[2])
    assert abs(float(lams[0].detach().mean()) - 1.0) < 1.0 and float(lams[0].detach().std()) > 0.3


@pytest.mark.parametrize("k", [None, 0.9, 3])
@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_images_is_an_error_for_every_k(k, n):
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=k))
    batches = [{"pixel_values": images(n)}] if n else []
    with pytest.raises(ResiDualInputError, match=f"saw {n} image.*at least 2"):
        fit_residual_bases(model, batches, progress=False)
    assert model.base_model.readout.layers_of("default")[0].residual_basis["default"].numel() == 0


def test_non_finite_pixels_are_an_error_naming_the_batch():
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=3))
    bad = images(8)
    bad[2, 0, 0, 0] = math.nan
    with pytest.raises(ResiDualInputError, match="batch 1: pixel_values hold NaN"):
        fit_residual_bases(model, [{"pixel_values": images(8)}, {"pixel_values": bad}], progress=False)


def test_non_finite_activations_are_an_error():
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=3))
    mlp = next(module for name, module in model.named_modules() if name.endswith("layers.0.mlp")).get_base_layer()
    with torch.no_grad():
        mlp.fc2.weight.mul_(1e37)  # normal pixels, activations that overflow float32 (as fp16 models can)
    with pytest.raises(ResiDualInputError, match="Non-finite activations in unit"):
        fit_residual_bases(model, [{"pixel_values": images(8)}], progress=False)


@pytest.mark.parametrize(("shape", "message"), [((2, 3, 30, 32), "do not split into 8x8"), ((2, 3, 32), "tensor")])
def test_bad_image_shapes_are_errors(shape, message):
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=3))
    with pytest.raises(ResiDualInputError, match=message):
        fit_residual_bases(model, [{"pixel_values": torch.randn(shape)}], progress=False)


def test_mixed_image_sizes_are_an_error():
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=3))
    batches = [{"pixel_values": images(4)}, {"pixel_values": torch.randn(4, 3, 16, 16)}]
    with pytest.raises(ResiDualInputError, match="one size"):
        fit_residual_bases(model, batches, progress=False)


def test_fewer_samples_than_components_is_an_error():
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=6))
    with pytest.raises(ValueError, match="needs 6 components but only 5 samples"):
        fit_residual_bases(model, [{"pixel_values": images(5)}], progress=False)


def test_batches_without_pixel_values_are_an_error():
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=3))
    with pytest.raises(ResiDualInputError, match="pixel_values"):
        fit_residual_bases(model, [{"image": images(4)}], progress=False)


def test_batches_come_as_dicts_tensors_or_image_label_pairs():
    """What PyTorch and transformers users hand over: dicts (with ``label`` or Trainer's ``labels``), bare tensors,
    and ``(images, labels)`` pairs (TensorDataset, torchvision): the same bases, the same units and labels."""
    from torch.utils.data import DataLoader, TensorDataset

    from peft_residual import collect_units, embed_batches

    x, y = images(12, seed=3), torch.arange(12) % 3
    forms = {
        "dict": [{"pixel_values": x[:6], "label": y[:6]}, {"pixel_values": x[6:], "label": y[6:]}],
        "trainer": [{"pixel_values": x[:6], "labels": y[:6]}, {"pixel_values": x[6:], "labels": y[6:]}],
        "pairs": DataLoader(TensorDataset(x, y), batch_size=6),
    }
    fitted = {}
    for name, batches in {
        **forms,
        "tensors": [x[:6], x[6:]],
        "one-tensor lists": DataLoader(TensorDataset(x), 6),
    }.items():
        model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=3))
        fit_residual_bases(model, batches, progress=False)
        fitted[name] = model.base_model.readout.components("default").basis
    for name, basis in fitted.items():
        torch.testing.assert_close(basis, fitted["dict"], rtol=0, atol=0, msg=name)
    for name, batches in forms.items():
        store = collect_units(model, batches, progress=False)
        assert torch.equal(store.labels, y), name
        features, labels = embed_batches(model, batches, progress=False)
        assert torch.equal(labels, y) and features.shape[0] == 12, name
    with pytest.raises(ResiDualInputError, match="batch 0 has no labels"):
        embed_batches(model, [x[:6]], progress=False)


def test_all_components_means_all_the_data_has():
    model = get_peft_model(make_model("clip_vision"), ResiDualConfig.residual())
    report = fit_residual_bases(model, [{"pixel_values": images(20)}], progress=False)
    assert report.components["layer0.mlp"] == 19  # 20 centred samples span 19 directions < dim 32
    assert report.components["layer0.head0"] == 32 // 4 + 2
    assert not report.clamped
    own_mean = get_peft_model(make_model("clip_vision"), ResiDualConfig.residual(ln_mean="unit"))
    report = fit_residual_bases(own_mean, [{"pixel_values": images(20)}], progress=False)
    assert report.components["layer0.head0"] == 32 // 4 + 1


ORACLE_CONFIGS = {
    "k4": ResiDualConfig(k=4, units="heads+mlps"),
    "residual": ResiDualConfig.preset("residual"),
    "residual*": ResiDualConfig.preset("residual*"),
    "coarse": ResiDualConfig.preset("coarse"),
    "mean": ResiDualConfig(k=3, rest="mean", layers=[1]),
    "unit-mean": ResiDualConfig(k=4, units="heads+mlps", ln_mean="unit"),
    "uncentred": ResiDualConfig(k=4, centre=False, rest="mean"),
}


def output_space_oracle(contributions: torch.Tensor, k: int, centre: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The PCA of one unit as the first landing computed it: output-space covariance (or, uncentred, the second
    moment about zero), eigh, top-k rows."""
    x = contributions.double()
    mean = x.mean(0) if centre else torch.zeros_like(x[0])
    _, vectors = torch.linalg.eigh((x - mean).T @ (x - mean) / (len(x) - centre))
    return mean, vectors.flip(-1)[:, :k].T


@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_head_coordinate_fit_matches_the_output_space_oracle(kind, name):
    """Heads are fitted in head coordinates; rebuilt in output space they act exactly like output-space PCA."""
    data = loader(n=96, batch=32)
    model = get_peft_model(make_model(kind), ResiDualConfig(**ORACLE_CONFIGS[name].to_dict() | {"peft_type": None}))
    report = fit_residual_bases(model, data, progress=False)
    config = model.peft_config["default"]
    stacked = _stacked_units(model, data, config.ln_mean)
    test = decompose_units(model, images(6, seed=4), config.ln_mean).contributions.double()
    names = model.base_model.arch.unit_names
    for layer in model.base_model.readout.layers_of("default"):
        mean, basis = layer.output_space("default")[:2]
        transformed = layer.is_transformed("default")
        lambdas = layer.residual_lambda["default"].detach().double() if transformed else None
        if transformed and config.scale_per == "unit":  # one scale per unit, repeated over its components
            rank = layer.residual_rank["default"]
            lambdas = lambdas.repeat_interleave(rank[rank > 0])
        start = 0
        for unit, unit_name in enumerate(layer.unit_names):
            index = names.index(unit_name)
            oracle_mean, _ = output_space_oracle(stacked[:, index], 1)  # the true mean, even when not subtracted
            torch.testing.assert_close(mean[unit].double(), oracle_mean, rtol=1e-5, atol=1e-6)
            if not transformed:
                continue
            k = report.components[unit_name]
            _, oracle_basis = output_space_oracle(stacked[:, index], k, config.centre)
            unit_basis, unit_lambdas = basis[start : start + k].double(), lambdas[start : start + k]
            start += k
            centred = test[:, index] - oracle_mean if config.centre else test[:, index]
            ours = ((centred @ unit_basis.T) * unit_lambdas) @ unit_basis
            oracle = ((centred @ oracle_basis.T) * unit_lambdas) @ oracle_basis
            scale = float(oracle.detach().abs().max()) + 1e-12
            assert float((ours - oracle).detach().abs().max()) <= 1e-5 * scale, (unit_name, k)


def test_degenerate_reference_images_are_refused_or_warned():
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=0.9))
    same = images(1).expand(20, -1, -1, -1).clone()
    with pytest.raises(ResiDualInputError, match="zero variance over the 20 reference images"):
        fit_residual_bases(model, [{"pixel_values": same}], progress=False)
    assert not model.base_model.readout.is_fitted("default")  # refused before anything was replaced
    with pytest.warns(UserWarning, match="2 reference images for units of up to") as caught:
        report = fit_residual_bases(model, [{"pixel_values": images(2)}], progress=False)
    assert caught[0].filename == __file__  # the caller's line, not the library's
    assert report.undersampled and not report.flat
    assert repr(report) == (  # counts, not the per-unit dicts
        f"FitReport(num_samples=2, units={len(report.components)}, num_scales={report.num_scales}, flat=0, "
        f"undersampled={len(report.undersampled)}, clamped=0)"
    )


@pytest.mark.parametrize("raw", ["uint8", "0-255 floats"])
def test_raw_pixels_are_refused_by_one_rule_at_fit_and_at_forward(raw):
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=2))
    pixels = (images(8).clamp(-2, 2) + 2) * 63
    pixels = pixels.to(torch.uint8) if raw == "uint8" else pixels.round()
    with pytest.raises(ResiDualInputError, match="image processor"):
        fit_residual_bases(model, [{"pixel_values": pixels}], progress=False)
    fit_residual_bases(model, loader(), progress=False)
    error = ResiDualInputError if raw == "uint8" else RuntimeError  # the range: an async assert in the forward
    with pytest.raises(error, match="image processor"), torch.no_grad():
        model(pixel_values=pixels)
