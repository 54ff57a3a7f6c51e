"""Unit decomposition: the pooled (or projected) CLS output as an exact sum of per-unit direct contributions.

For a pre-LN ViT the CLS residual entering the final norm is ``r = e + sum_l (sum_h a_lh + m_l)``: the embedding, every
head (its slice of the output projection on its output, plus ``bias / H``, times any layer scale) and every MLP, as
one pass records them (:class:`~peft_residual.records.UnitRecord`). Frozen at each sample's ``mean(r)`` and
``std(r)``, the final LayerNorm (then any projection) is linear. Its bias is shared ``1 / (2L + 1)`` per residual
block, a block's share split among its heads, and its centring either way (:data:`LN_MEANS`), both summing exactly to
the output: ``"shared"`` (the paper's code) gives a unit with share ``s`` ``gamma * (u - s * mean(r)) / std(r) + s *
beta``, ``"unit"`` centres each on its own mean.
"""

from __future__ import annotations

import torch

from ..models import Architecture
from ..records import UnitRecord
from .config import choices

LN_MEANS = choices("ln_mean")
"""How the final norm's mean is split among the units (see the module docstring)."""


def contributions(
    record: UnitRecord, arch: Architecture, ln_mean: str = "shared", shares: torch.Tensor | None = None
) -> torch.Tensor:
    """The direct contributions in output space of a pass's pieces, ``[batch, units, output_dim]`` (at least
    float32); they sum to the output. ``shares``: the units' bias shares where the pieces are (see :func:`linearise`).

    Example:
        >>> contributions(batch.record, Architecture(model)).sum(1)  # the model's output
    """
    return linearise(record.raw_units(arch), arch, ln_mean, shares=shares)


def norm_statistics(residual: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm's per-sample mean and standard deviation of the CLS residual ``[batch, hidden]``."""
    return residual.mean(dim=-1), torch.sqrt(residual.var(dim=-1, unbiased=False) + eps)


def frozen_norm(arch: Architecture, ln_mean: str = "shared") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The final norm frozen at a sample's statistics, and the projection, as float64 maps on the CPU: ``(N, n, t)``
    such that a unit with raw contribution ``v`` and bias share ``s`` contributes ``(N v - s mean(r) n) / std(r) +
    s t`` (``N`` ``[output_dim, hidden]``; ``n`` zero when each unit is centred on its own mean, whose centring ``N``
    then holds). :func:`linearise` computes the same elementwise, in the units' dtype (the cache's arithmetic)."""
    norm, projection, hidden = arch.final_norm, arch.projection, arch.hidden_size

    def float64(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().double().cpu()

    linear = torch.eye(hidden, dtype=torch.float64)
    if ln_mean == "unit":
        linear = linear - 1.0 / hidden
    offset = torch.zeros(hidden, dtype=torch.float64)
    if norm.weight is not None:
        linear = float64(norm.weight)[:, None] * linear
    if norm.bias is not None:
        offset = float64(norm.bias)
    if projection is not None:
        linear, offset = float64(projection.weight) @ linear, float64(projection.weight) @ offset
        if projection.bias is not None:
            offset = offset + float64(projection.bias)
    mean_direction = linear.sum(1) if ln_mean == "shared" else torch.zeros(len(linear), dtype=torch.float64)
    return linear, mean_direction, offset


def linearise(
    raw_units: torch.Tensor,
    arch: Architecture,
    ln_mean: str = "shared",
    shares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Push all the raw residual units of a pass, which sum to the residual, through the final norm, frozen at each
    sample's statistics, and the projection; ``ln_mean`` says how the norm's mean is split among the units
    (:data:`LN_MEANS`), ``shares`` gives the units' bias shares where the units are (default
    ``arch.bias_shares``)."""
    if ln_mean not in LN_MEANS:
        raise ValueError(f"ln_mean must be one of {LN_MEANS}, got {ln_mean!r}.")
    norm, projection, dtype = arch.final_norm, arch.projection, raw_units.dtype
    mean, std = norm_statistics(raw_units.sum(dim=1), norm.eps)
    shares = (arch.bias_shares if shares is None else shares).to(raw_units)
    if ln_mean == "shared":
        centred = raw_units - shares[None, :, None] * mean[:, None, None]
    else:
        centred = raw_units - raw_units.mean(dim=-1, keepdim=True)
    out = centred / std[:, None, None]
    if norm.weight is not None:
        out = out * norm.weight.to(dtype)
    if norm.bias is not None:
        out = out + shares[:, None] * norm.bias.to(dtype)
    if projection is not None:
        out = out @ projection.weight.to(dtype).T
        if projection.bias is not None:
            out = out + shares[:, None] * projection.bias.to(dtype)
    return out
