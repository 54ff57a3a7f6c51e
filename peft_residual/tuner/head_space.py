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
``[k, r]`` (packed, see :mod:`peft_residual.packing`), rebuilt as ``coefficients @ Q_h^T``. An uncentred fit (the coarse
baseline scales the raw ``c``) adds ``t_h`` as one more direction and uses no offset.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..models import Architecture
from .decomposition import frozen_norm


class HeadFrames(NamedTuple):
    """The head coordinates of one layer's heads, float64."""

    frames: torch.Tensor
    """``Q``: orthonormal frames ``[heads, output_dim, r]``."""
    offset: torch.Tensor
    """``t``: offsets ``[heads, output_dim]``."""


@torch.no_grad()
def head_frames(arch: Architecture, layer: int, ln_mean: str = "shared", centre: bool = True) -> HeadFrames:
    """``(Q, t)`` for the heads of ``layer``, in float64, from the base weights alone (``r`` is
    ``arch.max_rank("heads", ...)``)."""
    heads = arch.num_heads
    linear, mean_direction, offset = frozen_norm(arch, ln_mean)
    mapped, mapped_bias = mapped_heads(arch, layer, linear)
    columns = [mapped, mapped_bias[None, :, None].expand(heads, -1, 1)]
    if ln_mean == "shared":  # the direction the shared mean of the residual moves a unit along
        columns.append(mean_direction[None, :, None].expand(heads, -1, 1))
    share = float(arch.bias_shares[arch.heads_slice(layer)][0])
    offset = (share * offset).expand(heads, -1).clone()
    if not centre:
        columns.append(offset[:, :, None])
        offset = torch.zeros_like(offset)
    frames, triangular = torch.linalg.qr(torch.cat(columns, 2))
    signs = torch.sign(torch.diagonal(triangular, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    rank = arch.max_rank("heads", ln_mean, centre)
    return HeadFrames((frames * signs[:, None, :])[:, :, :rank], offset)


def mapped_heads(arch: Architecture, layer: int, linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the heads of ``layer`` add to the residual stream (``Architecture.head_map``, any layer scale included)
    pushed through ``linear`` ``[output_dim, hidden]`` (the frozen norm's linear part), in float64: per head its map
    of the head's output ``[heads, output_dim, head_dim]``, and the bias share of one head ``[output_dim]``."""
    weight, bias, scale = (t if t is None else t.detach().double().cpu() for t in arch.head_map(layer, torch.float64))
    mixing = linear * scale if scale is not None else linear
    bias = bias if bias is not None else torch.zeros(arch.hidden_size, dtype=torch.float64)
    return torch.einsum("oh,hnk->nok", mixing, weight), mixing @ bias
