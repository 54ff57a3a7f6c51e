import math

import pytest
import torch

from peft_residual import decompose_units
from peft_residual.analysis import (
    Spectrum,
    default_text_bank,
    embed_texts,
    is_hunchback,
    layer_profile,
    linear_dimension,
    similarity_matrix,
    somp,
    spectral_similarity,
    text_span,
    two_nn_dimension,
    unit_dimensions,
    unit_spectra,
)

from .conftest import images, make_model, word_tokenizer


def embedded(n: int, intrinsic: int, ambient: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(ambient, ambient, generator=generator, dtype=torch.float64))[0]
    return torch.rand(n, intrinsic, generator=generator, dtype=torch.float64) @ rotation[:intrinsic]


@pytest.mark.parametrize(("intrinsic", "ambient"), [(2, 10), (5, 20)])
def test_two_nn_recovers_the_dimension_of_a_flat_manifold(intrinsic, ambient):
    estimate = two_nn_dimension(embedded(2000, intrinsic, ambient))
    assert abs(estimate - intrinsic) < 0.15 * intrinsic + 0.2, estimate


def test_two_nn_matches_a_direct_computation():
    points = embedded(200, 3, 6, seed=4)
    ratios = []
    for i in range(len(points)):
        others = sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)
        ratios.append(others[1] / others[0])
    ratios.sort()
    used = int(len(ratios) * 0.9)
    xs = [math.log(r) for r in ratios[:used]]
    ys = [-math.log(1 - (i + 1) / len(ratios)) for i in range(used)]
    expected = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    assert two_nn_dimension(points) == pytest.approx(expected, rel=1e-9)


def test_linear_dimension_counts_components_to_the_variance_ratio():
    generator = torch.Generator().manual_seed(1)
    scales = torch.tensor([10.0, 5.0, 2.0] + [1e-4] * 7, dtype=torch.float64)
    points = torch.randn(500, 10, generator=generator, dtype=torch.float64) * scales
    assert linear_dimension(points, 0.99) == 3
    assert linear_dimension(points, 0.5) == 1


def test_unit_dimensions_and_the_layer_profile_on_a_tiny_model():
    model = make_model("dinov2")
    units = decompose_units(model, images(60, seed=3))
    dims = unit_dimensions(units.contributions, units.names, max_samples=50)
    assert set(dims) == set(units.names)
    assert all(0 < v["two_nn"] < 60 and 1 <= v["linear"] <= 32 for v in dims.values())
    profile = layer_profile(dims)
    heads = [dims[f"layer{i}.head{h}"]["two_nn"] for i in range(2) for h in range(4)]
    assert profile["two_nn"]["heads"] == pytest.approx([sum(heads[:4]) / 4, sum(heads[4:]) / 4])
    assert profile["linear"]["mlp"] == [dims["layer0.mlp"]["linear"], dims["layer1.mlp"]["linear"]]


def test_hunchback_means_an_inner_peak_above_both_ends():
    assert is_hunchback([2.0, 5.0, 9.0, 6.0, 3.0])
    assert not is_hunchback([2.0, 4.0, 6.0, 8.0])  # rising only
    assert not is_hunchback([5.0, 5.2, 5.1])  # flat within the margin


def spectrum(rows, variances):
    return Spectrum(torch.tensor(rows, dtype=torch.float64), torch.tensor(variances, dtype=torch.float64))


def test_spectral_similarity_bounds_and_a_hand_computed_case():
    a = spectrum([[1, 0, 0], [0, 1, 0]], [3.0, 1.0])
    assert spectral_similarity(a, a, ratio=1.0) == pytest.approx(1.0)
    assert spectral_similarity(a, spectrum([[0, 0, 1]], [1.0]), ratio=1.0) == pytest.approx(0.0)
    # b's first component is a's second; the greedy match pairs them (|cos| = 1), then a's first with b's second
    c = math.cos(0.3)
    b = spectrum([[0, 1, 0], [c, 0, math.sin(0.3)]], [2.0, 2.0])
    expected = math.sqrt(0.25 * 0.5) * 1.0 + math.sqrt(0.75 * 0.5) * c
    assert spectral_similarity(a, b, ratio=1.0) == pytest.approx(expected)
    assert spectral_similarity(b, a, ratio=1.0) == pytest.approx(expected)
    assert spectral_similarity(a, b, ratio=0.5) == pytest.approx(0.0)  # pruned to their orthogonal top components


def test_similarity_matrix_of_a_fit_with_itself_has_a_unit_diagonal():
    units = decompose_units(make_model("clip_vision"), images(30))
    spectra = unit_spectra(units.contributions, units.names)
    matrix = similarity_matrix(spectra, spectra, units.names)
    assert matrix.shape == (len(units.names),) * 2
    torch.testing.assert_close(matrix.diagonal(), torch.ones(len(units.names), dtype=matrix.dtype))
    assert float(matrix.max()) <= 1.0 + 1e-9 and float(matrix.min()) >= 0.0


def test_text_span_and_somp_find_a_planted_direction():
    generator = torch.Generator().manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(20, 8, generator=generator), dim=-1)
    head = torch.randn(50, 1, generator=generator) * texts[7] + 0.5 * texts[2] * torch.randn(50, 1)
    spans = text_span(head, texts, steps=3)
    assert [i for i, _ in spans[:2]] == [7, 2] or [i for i, _ in spans[:2]] == [2, 7]
    matched = somp(head, texts, steps=2)
    assert {i for i, _ in matched} == {2, 7} and matched[-1][1] == pytest.approx(1.0)
    assert all(0 <= share <= 1 for _, share in spans)


def test_text_span_on_a_tiny_random_clip_is_deterministic():
    model = make_model("clip")
    bank = default_text_bank()
    assert len(bank) > 100 and len(set(bank)) == len(bank)
    texts = embed_texts(model, word_tokenizer(), bank[:40])
    assert texts.shape == (40, 24)
    units = decompose_units(model, images(16))
    head = units.contributions[:, units.names.index("layer1.head2")]
    first, again = text_span(head, texts, 4), text_span(head, texts, 4)
    assert first == again and len({i for i, _ in first}) == 4
    with pytest.raises(ValueError, match="steps must be in"):
        somp(head, texts, 41)
