"""Compact storage of orthonormal bases as Householder reflectors.

``k`` orthonormal rows of length ``n`` have ``k * n - k * (k + 1) / 2`` degrees of freedom, about half of their
``k * n`` entries (exactly half plus ``n / 2`` numbers for a square basis). The QR factorisation of the ``[n, k]``
column matrix ``B^T = H_1 ... H_k R`` writes them as ``k`` Householder reflectors whose vectors fill the strictly
lower triangle; ``R`` is diagonal with entries ``+-1`` because the columns are orthonormal. Only the reflector
vectors are stored, and each reflector's ``tau = 2 / |v|^2`` is recomputed at load. So whatever rounding the stored
vectors went through (a float16 cast), the rebuilt rows are exactly orthonormal. ``R``'s signs are not stored:
the ResiDual transform ``phi^T diag(lambda) phi`` is unchanged when a row flips sign, and the rebuild applies the
same canonical signs as the fit.
"""

from __future__ import annotations

import torch


def packed_size(rank: int, dim: int) -> int:
    """The number of stored values for ``rank`` orthonormal rows of length ``dim``."""
    return rank * dim - rank * (rank + 1) // 2


def canonical_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive, making bases reproducible."""
    index = rows.abs().argmax(dim=1, keepdim=True)
    return rows * torch.sign(rows.gather(1, index))


def _below_diagonal(dim: int, rank: int) -> torch.Tensor:
    return torch.ones(dim, rank, dtype=torch.bool).tril(-1)


def pack_orthonormal(rows: torch.Tensor) -> torch.Tensor:
    """The reflector vectors ``[packed_size(k, n)]`` (float64) of orthonormal ``rows`` ``[k, n]``.

    Example:
        >>> rows = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))[0].T
        >>> torch.allclose(unpack_orthonormal(pack_orthonormal(rows), 3, 5).abs(), rows.abs())
        True
    """
    rank, dim = rows.shape
    if rank == 0:
        return rows.new_zeros(0, dtype=torch.float64)
    reflectors, _ = torch.geqrf(rows.double().T.contiguous())
    return reflectors[_below_diagonal(dim, rank)]


def unpack_orthonormal(packed: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Exactly orthonormal rows ``[rank, dim]`` (float64, canonical signs) from :func:`pack_orthonormal`'s output."""
    if rank == 0:
        return packed.new_zeros(0, dim, dtype=torch.float64)
    mask = _below_diagonal(dim, rank)
    reflectors = torch.zeros(dim, rank, dtype=torch.float64)
    reflectors[mask] = packed.double().cpu()
    tau = 2.0 / (1.0 + reflectors.pow(2).sum(0))  # each vector's implicit leading 1 sits on the diagonal
    return canonical_signs(torch.linalg.householder_product(reflectors, tau).T)
