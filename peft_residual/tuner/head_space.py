"""Head coordinates: the small subspace in which a head's direct contribution lives.

A head's contribution is ``c = M (W_h z + b_h) / sigma - m_h P gamma / sigma + t_h`` with ``z`` the head's output,
``W_h`` its slice of the attention output projection, ``b_h`` its bias share, ``M`` the frozen final norm's linear
part times the projection ``P`` (``P diag(gamma) diag(layer scale)``, with the norm's centring ``I - 11^T / d`` in
between when each unit is centred on its own mean), ``sigma`` the per-sample norm statistic, ``m_h`` the head's
share of the residual's mean (zero when each unit is centred on its own mean) and ``t_h`` the head's share of the
norm and projection biases. So ``c - t_h`` always lies in the span of ``A_h = [M W_h, M b_h (, P gamma)]``: at most
``head_dim + 1`` directions fixed by the base weights (``head_dim + 2`` with the shared mean). With ``Q_h`` an
orthonormal basis of that span (float64 QR, signs fixed so the result is deterministic), a head's PCA runs on
``y = Q_h^T (c - t_h)``: covariances of ``r^2`` instead of ``output_dim^2``, and bases stored as coefficients
``[k, r]`` (packed, see :mod:`.packing`), rebuilt as ``coefficients @ Q_h^T``. An uncentred fit (the coarse
baseline scales the raw ``c``) adds ``t_h`` as one more direction and uses no offset.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..models import Architecture


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().double().cpu()


class HeadFrames(NamedTuple):
    """The head coordinates of one layer's heads, float64."""

    frames: torch.Tensor
    """``Q``: orthonormal frames ``[heads, output_dim, r]``."""
    offset: torch.Tensor
    """``t``: offsets ``[heads, output_dim]``."""
    triangular: torch.Tensor
    """``R`` ``[heads, r, columns]``: a head's coordinates are ``R x / sigma`` with ``x = [z; 1; -s mean(r)
    (shared mean only); sigma (uncentred only)]``, so they follow from the head's output ``z`` alone."""


@torch.no_grad()
def head_frames(arch: Architecture, layer: int, ln_mean: str = "shared", centre: bool = True) -> HeadFrames:
    """``(Q, t, R)`` for the heads of ``layer``, in float64, from the base weights alone (``r`` is
    ``arch.max_rank("heads", ...)``)."""
    hidden, heads = arch.hidden_size, arch.num_heads
    norm, projection = arch.final_norm, arch.projection
    weight, bias, scale = (t if t is None else _float64(t) for t in arch.head_map(layer, torch.float64))
    # the frozen norm's linear part, left of the layer scale: centring (own-mean split only), gamma, projection
    linear = torch.eye(hidden, dtype=torch.float64)
    if ln_mean == "unit":
        linear = linear - 1.0 / hidden
    if norm.weight is not None:
        linear = _float64(norm.weight)[:, None] * linear
    if projection is not None:
        linear = _float64(projection.weight) @ linear
    mixing = linear * scale if scale is not None else linear
    bias = bias if bias is not None else torch.zeros(hidden, dtype=torch.float64)
    columns = [torch.einsum("oh,hnk->nok", mixing, weight), (mixing @ bias)[None, :, None].expand(heads, -1, 1)]
    if ln_mean == "shared":  # the direction the shared mean of the residual moves a unit along
        columns.append(linear.sum(1)[None, :, None].expand(heads, -1, 1))
    share = float(arch.bias_shares[arch.heads_slice(layer)][0])
    offset = torch.zeros(arch.output_dim, dtype=torch.float64)
    if norm.bias is not None:
        beta = _float64(norm.bias)
        offset = _float64(projection.weight) @ beta if projection is not None else beta
    if projection is not None and projection.bias is not None:
        offset = offset + _float64(projection.bias)
    offset = (share * offset).expand(heads, -1).clone()
    if not centre:
        columns.append(offset[:, :, None])
        offset = torch.zeros_like(offset)
    frames, triangular = torch.linalg.qr(torch.cat(columns, 2))
    signs = torch.sign(torch.diagonal(triangular, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    rank = arch.max_rank("heads", ln_mean, centre)
    frames, triangular = frames * signs[:, None, :], triangular * signs[:, :, None]
    return HeadFrames(frames[:, :, :rank], offset, triangular[:, :rank])
