"""Spectral similarity between two PCA fits of units (e.g. the same model on two data sets).

Each fit is pruned to the components reaching 90 % of its variance. Components are matched greedily by absolute
cosine (the best remaining pair first), and the similarity is ``sum over matched pairs of sqrt(p_i q_j) |cos_ij|``
with ``p`` and ``q`` the pruned spectra normalised to sum 1. It is 1 for identical fits, 0 for orthogonal ones and
symmetric; by Cauchy-Schwarz it never exceeds 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ResiDualInputError


@dataclass
class Spectrum:
    """A unit's principal components ``[k, dim]`` (rows) and their variances ``[k]``, descending."""

    components: torch.Tensor
    variances: torch.Tensor

    def pruned(self, ratio: float = 0.9) -> Spectrum:
        """The fewest leading components reaching ``ratio`` of the variance."""
        ratios = torch.cumsum(self.variances, 0) / self.variances.sum()
        k = int(torch.searchsorted(ratios, torch.tensor(ratio, dtype=ratios.dtype))) + 1
        return Spectrum(self.components[:k], self.variances[:k])


@torch.no_grad()
def unit_spectra(contributions: torch.Tensor, names: Sequence[str]) -> dict[str, Spectrum]:
    """The PCA (float64) of every unit of ``contributions`` ``[n, units, dim]``."""
    spectra = {}
    for unit, name in enumerate(names):
        x = contributions[:, unit].double()
        _, singular, vectors = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        spectra[name] = Spectrum(vectors, singular.pow(2) / max(len(x) - 1, 1))
    return spectra


@torch.no_grad()
def spectral_similarity(first: Spectrum, second: Spectrum, ratio: float = 0.9) -> float:
    """Eigenvalue-weighted greedy matching of two spectra (see the module docstring)."""
    a, b = first.pruned(ratio), second.pruned(ratio)
    if a.components.shape[1] != b.components.shape[1]:
        raise ResiDualInputError(
            f"The two fits live in spaces of {a.components.shape[1]} and {b.components.shape[1]} dimensions."
        )
    cosines = (a.components.double() @ b.components.double().T).abs()
    weights = torch.sqrt(torch.outer(a.variances / a.variances.sum(), b.variances / b.variances.sum()))
    remaining = cosines.clone()
    total = 0.0
    for _ in range(min(cosines.shape)):
        i, j = divmod(int(remaining.argmax()), remaining.shape[1])
        total += float(weights[i, j] * cosines[i, j])
        remaining[i, :] = -1.0
        remaining[:, j] = -1.0
    return total


def similarity_matrix(
    first: dict[str, Spectrum], second: dict[str, Spectrum], names: Sequence[str], ratio: float = 0.9
) -> torch.Tensor:
    """``[units, units]``: entry ``(i, j)`` compares unit ``i`` of the first fit with unit ``j`` of the second."""
    pruned_first = {name: first[name].pruned(ratio) for name in names}
    pruned_second = {name: second[name].pruned(ratio) for name in names}
    return torch.tensor([[spectral_similarity(pruned_first[i], pruned_second[j], 1.0) for j in names] for i in names])
