import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_residual import (
    Architecture,
    CentroidClassifier,
    ResiDualConfig,
    ablated_output,
    collect_units,
    decompose_units,
    fit_residual_bases,
    rank_heads,
    ranking_curves,
)
from peft_residual.plots import ranking_plot

from .conftest import images, loader, make_model, model_output


@pytest.fixture(scope="module")
def study():
    model = make_model("dinov2")
    x, labels = images(40, seed=2), torch.arange(40) % 4
    units = decompose_units(model, x)
    classifier = CentroidClassifier.from_features(units.contributions.sum(1), labels, list("abcd"))
    return model, x, labels, units, classifier


def test_single_head_accuracy_and_correlations_match_a_direct_computation(study):
    _, _, labels, units, classifier = study
    ranking = rank_heads(units.contributions, labels, classifier, units.names, "S")
    heads = [i for i, n in enumerate(units.names) if ".head" in n]
    assert sorted(ranking.names) == sorted(units.names[i] for i in heads)
    for name, score in zip(ranking.names, ranking.scores, strict=True):
        own = units.contributions[:, units.names.index(name)].double()
        logits = F.normalize(own, dim=-1) @ classifier.weights.double().T
        assert score == pytest.approx(float((logits.argmax(-1) == labels).double().mean()))
    assert ranking.scores == sorted(ranking.scores, reverse=True)
    output = units.contributions.double().sum(1)
    projector = classifier.weights.double().T @ torch.linalg.pinv(classifier.weights.double().T)  # onto span(T)
    for criterion, transform in (("U", lambda v: v), ("U|T", lambda v: v @ projector)):
        ranking = rank_heads(units.contributions, labels, classifier, units.names, criterion)
        for name, score in zip(ranking.names, ranking.scores, strict=True):
            own = units.contributions[:, units.names.index(name)].double()
            expected = F.cosine_similarity(transform(own), transform(output), dim=-1).mean()
            assert score == pytest.approx(float(expected), abs=1e-5)


def test_random_rankings_are_seeded_permutations(study):
    _, _, labels, units, classifier = study
    a, b, c = (rank_heads(units.contributions, labels, classifier, units.names, "random", s) for s in (1, 1, 2))
    assert a.names == b.names != c.names and sorted(a.names) == sorted(c.names)
    assert all(math.isnan(s) for s in a.scores)
    assert len(a.top(0.01)) == 1 and len(a.top(0.5)) == 4 and a.top(1.0) == a.names


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ablated_output_equals_the_adapter_built_from_the_selection(study, ablation):
    """The ranking study's ablation is what ResiDualConfig(heads=...) computes with unit scales on raw heads."""
    model, _, _, units, classifier = study
    ranking = rank_heads(units.contributions, torch.arange(40) % 4, classifier, units.names, "U")
    keep = ranking.top(0.25)
    config = ResiDualConfig(heads=keep, k=None, centre=False, lambda_init="ones", scale_per="unit", rest=ablation)
    adapter = get_peft_model(make_model("dinov2"), config)
    reference = loader()
    fit_residual_bases(adapter, reference, progress=False)
    means = torch.cat([decompose_units(model, b["pixel_values"]).contributions for b in reference]).mean(0)
    x = images(5, seed=9)
    expected = ablated_output(decompose_units(model, x).contributions, units.names, keep, ablation, means)
    with torch.no_grad():
        torch.testing.assert_close(model_output(adapter, x), expected, rtol=1e-4, atol=1e-5)


def test_ranking_curves_cover_every_criterion_and_plot(study, tmp_path):
    model, x, labels, units, classifier = study
    store = collect_units(model, [{"pixel_values": x, "label": labels}], progress=False)
    torch.testing.assert_close(store.contributions(), units.contributions)
    curves = ranking_curves(
        units.contributions, labels, units.contributions, labels, classifier, units.names, fractions=(0.25, 0.5)
    )
    assert set(curves["curves"]) == {"S", "U", "U|T", "random"}
    assert len(curves["curves"]["random"]["mean"]["0.25"]) == 3 and len(curves["curves"]["S"]["zero"]["0.5"]) == 1
    assert curves["num_heads"] == 8 and 0.0 <= curves["full_accuracy"] <= 1.0
    best = rank_heads(units.contributions, labels, classifier, units.names, "S").top(0.25)
    assert curves["rankings"]["S"][:2] == best
    path = ranking_plot(curves, tmp_path / "heads.png", "tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Architecture(model).unit_names == units.names


def test_planted_informative_heads_rank_first_under_every_criterion():
    """Two of eight heads carry the class (along the classifier's class vectors), the other heads are
    class-independent noise and the embedding and MLPs a constant: S, U and U|T must all put the two first, and
    keeping them alone must classify."""
    generator = torch.Generator().manual_seed(0)
    names = ["embedding"] + [f"layer{i}.{u}" for i in range(2) for u in (*(f"head{h}" for h in range(4)), "mlp")]
    planted = {"layer0.head1", "layer1.head2"}
    n, dim = 200, 16
    labels = torch.arange(n) % 4
    contributions = 0.5 * torch.randn(n, len(names), dim, generator=generator)
    constant = torch.zeros(dim)
    constant[8:] = 3.0
    for i, name in enumerate(names):
        if name in planted:
            contributions[:, i] = 2.0 * F.one_hot(labels, dim).float() + 0.1 * torch.randn(n, dim, generator=generator)
        elif ".head" not in name:
            contributions[:, i] = constant + 0.1 * torch.randn(n, dim, generator=generator)
    classifier = CentroidClassifier.from_features(contributions.sum(1), labels, list("abcd"))
    for criterion in ("S", "U", "U|T"):
        ranking = rank_heads(contributions, labels, classifier, names, criterion)
        assert set(ranking.top(0.25)) == planted, (criterion, ranking.names)
    curves = ranking_curves(contributions, labels, contributions, labels, classifier, names, fractions=(0.25,))
    assert all(curves["curves"][c]["mean"]["0.25"][0] > 0.95 for c in ("S", "U", "U|T"))
    assert max(curves["curves"]["random"]["mean"]["0.25"]) < 0.95  # no random draw of two heads gets both
