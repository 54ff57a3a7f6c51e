"""Coarse unit alignment: rank the heads by how they alone align with a frozen classifier, keep the top ones.

Three criteria from the paper, plus a random control:

- ``"S"``: a head's own accuracy, the frozen classifier applied to its direct contribution alone;
- ``"U"``: the mean cosine similarity between a head's contribution and the model's full output;
- ``"U|T"``: the same after projecting both on the span of the classifier's class vectors;
- ``"random"``: a seeded permutation.

:func:`ablation_accuracy` keeps the top fraction of heads and zero- or mean-ablates every other unit (the other
heads, the MLPs and the embedding). ``ResiDualConfig(heads=ranking.top(0.05), k=None, centre=False,
lambda_init="ones", scale_per="unit", rest="mean")`` builds the same model as an adapter, to train from there.

Example:
    >>> units = collect_units(model, DataLoader(train, batch_size=64))
    >>> ranking = rank_heads(units.contributions(), units.labels, classifier, Architecture(model).unit_names, "S")
    >>> ranking.top(0.05)
    ['layer11.head3', 'layer10.head5', 'layer11.head0', 'layer9.head1']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..classifiers import Classifier
from ..errors import ResiDualInputError
from ..inference import accuracy

CRITERIA = ("S", "U", "U|T", "random")
FRACTIONS = (0.01, 0.05, 0.10, 0.25, 0.50)
ABLATIONS = ("zero", "mean")


def head_indices(names: Sequence[str]) -> list[int]:
    """Positions of the attention heads among the unit ``names``."""
    return [i for i, name in enumerate(names) if ".head" in name]


@dataclass
class HeadRanking:
    """Heads best first, with each one's score under ``criterion`` (``nan`` for random)."""

    criterion: str
    names: list[str]
    scores: list[float]

    def top(self, fraction: float) -> list[str]:
        """The best ``fraction`` of the heads, at least one."""
        if not 0.0 < fraction <= 1.0:
            raise ResiDualInputError(f"The fraction of heads to keep must be in (0, 1], got {fraction}.")
        return self.names[: max(1, round(fraction * len(self.names)))]


@torch.no_grad()
def head_scores(
    contributions: torch.Tensor, labels: torch.Tensor, classifier: Classifier, names: Sequence[str], criterion: str
) -> torch.Tensor:
    """The score of every head (in the order of :func:`head_indices`) under ``criterion`` (not ``"random"``)."""
    heads = contributions[:, head_indices(names)].float()
    if criterion == "S":
        return torch.tensor([accuracy(classifier(heads[:, h]), labels) for h in range(heads.shape[1])])
    output = contributions.float().sum(1)
    if criterion == "U|T":
        directions = torch.linalg.qr(classifier.weights.double().T)[0].float()  # [dim, classes], orthonormal
        output = output @ directions
        heads = heads @ directions
    elif criterion != "U":
        raise ResiDualInputError(f"No head criterion {criterion!r}; the criteria are {', '.join(CRITERIA)}.")
    return F.cosine_similarity(heads, output[:, None], dim=-1).mean(0)


def rank_heads(
    contributions: torch.Tensor,
    labels: torch.Tensor,
    classifier: Classifier,
    names: Sequence[str],
    criterion: str = "S",
    seed: int = 0,
) -> HeadRanking:
    """Order the heads of ``contributions`` ``[n, units, dim]`` (unit ``names`` along dimension 1) best first."""
    if contributions.dim() != 3 or contributions.shape[1] != len(names):
        raise ResiDualInputError(
            f"contributions must be [images, {len(names)} units, dim] for the {len(names)} unit names, got "
            f"{tuple(contributions.shape)}."
        )
    head_names = [names[i] for i in head_indices(names)]
    if criterion == "random":
        order = torch.randperm(len(head_names), generator=torch.Generator().manual_seed(seed))
        return HeadRanking(criterion, [head_names[i] for i in order], [math.nan] * len(head_names))
    scores = head_scores(contributions, labels, classifier, names, criterion)
    order = torch.argsort(scores, descending=True, stable=True)
    return HeadRanking(criterion, [head_names[i] for i in order], [float(scores[i]) for i in order])


@torch.no_grad()
def ablated_output(
    contributions: torch.Tensor,
    names: Sequence[str],
    keep: Sequence[str],
    ablation: str = "mean",
    means: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output with only the heads in ``keep``: every other unit dropped (``"zero"``) or replaced by its mean
    over reference images (``"mean"``, ``means`` ``[units, dim]``)."""
    if ablation not in ABLATIONS:
        raise ResiDualInputError(f"Ablation must be one of {ABLATIONS}, got {ablation!r}.")
    keep = set(keep)
    kept = torch.tensor([name in keep for name in names])
    output = contributions[:, kept].sum(1)
    if ablation == "mean":
        if means is None:
            raise ResiDualInputError("Mean ablation needs the units' means over reference images (means=...).")
        output = output + means[~kept].sum(0)
    return output


def ablation_accuracy(
    ranking: HeadRanking,
    contributions: torch.Tensor,
    labels: torch.Tensor,
    classifier: Classifier,
    names: Sequence[str],
    fractions: Sequence[float] = FRACTIONS,
    ablation: str = "mean",
    means: torch.Tensor | None = None,
) -> dict[float, float]:
    """Test accuracy of the frozen classifier keeping the top ``fractions`` of ``ranking``, the rest ablated."""
    return {
        fraction: accuracy(
            classifier(ablated_output(contributions, names, ranking.top(fraction), ablation, means)), labels
        )
        for fraction in fractions
    }


def ranking_curves(
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    classifier: Classifier,
    names: Sequence[str],
    fractions: Sequence[float] = FRACTIONS,
    random_seeds: Sequence[int] = (0, 1, 2),
) -> dict:
    """The paper's top-k heads study: heads ranked on ``reference`` contributions by every criterion (random with
    each seed), test accuracy of the top ``fractions`` under zero and mean ablation, and the full model's.

    Returns a JSON-ready dict: ``{"full_accuracy", "all_heads": {ablation: acc}, "curves": {criterion: {ablation:
    {fraction: [acc per seed]}}}, "rankings": {criterion: names}}``.
    """
    means = reference.float().mean(0)
    all_heads = [names[i] for i in head_indices(names)]
    result = {
        "fractions": list(fractions),
        "num_heads": len(all_heads),
        "full_accuracy": accuracy(classifier(test.float().sum(1)), test_labels),
        "all_heads": {
            ablation: accuracy(classifier(ablated_output(test, names, all_heads, ablation, means)), test_labels)
            for ablation in ABLATIONS
        },
        "curves": {},
        "rankings": {},
    }
    for criterion in CRITERIA:
        seeds = random_seeds if criterion == "random" else [0]
        rankings = [rank_heads(reference, reference_labels, classifier, names, criterion, seed) for seed in seeds]
        result["rankings"][criterion] = rankings[0].names
        result["curves"][criterion] = {
            ablation: {
                str(fraction): [
                    ablation_accuracy(ranking, test, test_labels, classifier, names, [fraction], ablation, means)[
                        fraction
                    ]
                    for ranking in rankings
                ]
                for fraction in fractions
            }
            for ablation in ABLATIONS
        }
    return result
