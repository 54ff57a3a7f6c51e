"""Head coordinates: the small subspace in which a head's direct contribution lives.

A head's contribution is ``c = M (W_h z + b_h) / sigma + t_h`` with ``z`` the head's output, ``W_h`` its slice of
the attention output projection, ``b_h`` its bias share, ``M = P diag(gamma) (I - 11^T / d) diag(layer scale)`` the
frozen final norm (and projection ``P``), ``sigma`` the per-sample norm statistic and ``t_h`` the head's share of the
norm and projection biases. So ``c - t_h`` always lies in the span of ``A_h = [M W_h, M b_h]``, at most
``head_dim + 1`` directions fixed by the base weights. With ``Q_h`` an orthonormal basis of that span (float64 QR,
signs fixed so the result is deterministic), a head's PCA runs on ``y = Q_h^T (c - t_h)``: covariances of
``(head_dim+1)^2`` instead of ``output_dim^2``, and bases stored as coefficients ``[k, head_dim + 1]`` (packed, see
:mod:`.packing`), rebuilt as ``coefficients @ Q_h^T``.
"""

from __future__ import annotations

import torch

from .architectures import Architecture
from .decomposition import bias_shares


@torch.no_grad()
def head_frames(arch: Architecture, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, t)`` for the heads of ``layer``: orthonormal frames ``[heads, output_dim, r]`` and offsets
    ``[heads, output_dim]``, in float64, from the base weights alone."""
    hidden, heads, head_dim = arch.hidden_size, arch.num_heads, arch.head_dim
    norm, projection = arch.final_norm, arch.projection
    out_proj = arch.module(arch.spec.attention_out, layer)
    mixing = torch.eye(hidden, dtype=torch.float64) - 1.0 / hidden  # the norm's centring
    scale = arch.attention_layer_scale(layer)
    if scale is not None:
        mixing = mixing * scale.detach().double().cpu()
    if norm.weight is not None:
        mixing = norm.weight.detach().double().cpu()[:, None] * mixing
    if projection is not None:
        mixing = projection.weight.detach().double().cpu() @ mixing
    weight = out_proj.weight.detach().double().cpu().view(hidden, heads, head_dim)
    bias = out_proj.bias.detach().double().cpu() / heads if out_proj.bias is not None else torch.zeros(hidden).double()
    spans = torch.cat(
        [torch.einsum("oh,hnk->nok", mixing, weight), (mixing @ bias)[None, :, None].expand(heads, -1, 1)], 2
    )
    frames, triangular = torch.linalg.qr(spans)
    signs = torch.sign(torch.diagonal(triangular, dim1=-2, dim2=-1))
    frames = frames * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None, :]
    share = float(bias_shares(arch)[arch.heads_slice(layer)][0])
    offset = torch.zeros(arch.output_dim, dtype=torch.float64)
    if norm.bias is not None:
        beta = norm.bias.detach().double().cpu()
        offset = projection.weight.detach().double().cpu() @ beta if projection is not None else beta
    if projection is not None and projection.bias is not None:
        offset = offset + projection.bias.detach().double().cpu()
    return frames, (share * offset).expand(heads, -1).clone()
