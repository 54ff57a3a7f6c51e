"""Intrinsic dimension of the units: TwoNN (non-linear) and the linear dimension at an explained-variance ratio.

TwoNN (Facco et al., 2017): for every sample, ``mu = r2 / r1``, the ratio of its second to its first
nearest-neighbour distance, is Pareto distributed with the data's intrinsic dimension ``d`` as exponent, so
``-log(1 - F(mu)) = d log(mu)`` for the empirical distribution ``F``. The largest 10 % of ratios are dropped (they
come from the sparsest regions) and the line is fitted through the origin. The linear dimension is the number of
principal components reaching 99 % of the variance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ResiDualInputError
from ..unit_names import UNIT_NAME


@torch.no_grad()
def two_nn_dimension(points: torch.Tensor, discard: float = 0.1) -> float:
    """TwoNN estimate for ``points`` ``[n, dim]`` (n of a few thousand at most: the distances are ``n x n``)."""
    if points.dim() != 2 or len(points) < 3:
        raise ResiDualInputError(f"TwoNN needs at least 3 points as [n, dim], got {tuple(points.shape)}.")
    points = points.double()
    distances = torch.cdist(points, points)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(2, dim=1, largest=False).values
    keep = nearest[:, 0] > 0  # exact duplicates have no defined ratio
    ratios = torch.sort(nearest[keep, 1] / nearest[keep, 0]).values
    n = len(ratios)
    used = int(n * (1.0 - discard))
    if used < 2:
        raise ResiDualInputError(f"TwoNN kept {used} distinct points after dropping duplicates; pass more samples.")
    x = torch.log(ratios[:used])
    y = -torch.log1p(-torch.arange(1, used + 1, dtype=torch.float64) / n)
    return float((x * y).sum() / (x * x).sum())


@torch.no_grad()
def linear_dimension(points: torch.Tensor, threshold: float = 0.99) -> int:
    """Principal components of ``points`` ``[n, dim]`` needed to reach ``threshold`` of the variance."""
    centred = points.double() - points.double().mean(0)
    variances = torch.linalg.svdvals(centred).pow(2)
    ratios = torch.cumsum(variances, 0) / variances.sum()
    return int(torch.searchsorted(ratios, torch.tensor(threshold, dtype=torch.float64))) + 1


def unit_dimensions(
    contributions: torch.Tensor,
    names: Sequence[str],
    max_samples: int = 2000,
    seed: int = 0,
    threshold: float = 0.99,
) -> dict[str, dict[str, float]]:
    """``{unit: {"two_nn": ..., "linear": ...}}`` for every unit of ``contributions`` ``[n, units, dim]``, on at
    most ``max_samples`` images drawn with ``seed`` (memory and time stay bounded whatever ``n``)."""
    if contributions.dim() != 3 or contributions.shape[1] != len(names):
        raise ResiDualInputError(
            f"contributions must be [images, {len(names)} units, dim], got {tuple(contributions.shape)}."
        )
    if len(contributions) > max_samples:
        rows = torch.randperm(len(contributions), generator=torch.Generator().manual_seed(seed))[:max_samples]
        contributions = contributions[rows]
    return {
        name: {
            "two_nn": two_nn_dimension(contributions[:, unit]),
            "linear": linear_dimension(contributions[:, unit], threshold),
        }
        for unit, name in enumerate(names)
    }


def layer_profile(dimensions: dict[str, dict[str, float]]) -> dict[str, dict[str, list[float]]]:
    """Per layer (in depth order), the mean over its heads and its MLP, for each estimate."""
    layers: dict[int, dict[str, list[dict[str, float]]]] = {}
    for name, values in dimensions.items():
        match = UNIT_NAME.fullmatch(name)
        if match:
            kind = "mlp" if match.group(2) is None else "heads"
            layers.setdefault(int(match.group(1)), {"heads": [], "mlp": []})[kind].append(values)
    profile: dict[str, dict[str, list[float]]] = {}
    for estimate in ("two_nn", "linear"):
        profile[estimate] = {
            kind: [sum(v[estimate] for v in layers[i][kind]) / len(layers[i][kind]) for i in sorted(layers)]
            for kind in ("heads", "mlp")
        }
    return profile


def is_hunchback(values: Sequence[float], margin: float = 0.1) -> bool:
    """Whether a depth profile rises then falls: its peak is an inner layer, above both ends by ``margin``."""
    peak = max(range(len(values)), key=values.__getitem__)
    if peak in (0, len(values) - 1):
        return False
    top = values[peak]
    return top >= (1 + margin) * values[0] and top >= (1 + margin) * values[-1]
