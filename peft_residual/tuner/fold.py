"""The forward's readout: each unit piece is folded into its adapter's output the moment its module produces it.

Every adapted output is affine in the raw pieces once the final norm's statistics are frozen: with ``r`` the CLS
residual entering the norm, ``mu`` its mean and ``sigma`` its standard deviation, a unit with raw contribution
``v`` and bias share ``s`` contributes ``c = (N v - s mu n) / sigma + s t`` (:func:`~.decomposition.frozen_norm`),
and the adapter turns it into ``w c + Phi^T diag(lambda) Phi (c - m)`` (``w`` 1 for a unit added unchanged or
keeping its remainder, else 0). Summed, with ``alpha`` 1 where the model's own output ``y = sum(c)`` is the cheaper
start and 0 where nothing is:

    ``out = alpha y + (sum_p x_p M_p - mu v_mean) / sigma + v_const``

where ``x_p`` is one piece as its module produced it (the embedding, a layer's concatenated heads entering the
output projection, an MLP's output), all at CLS. So one forward adds one ``addmm`` per piece that carries a
transformed unit (or a unit whose weight differs from ``alpha``) and a handful of ops at the end, and keeps no
piece: a :class:`Fold` is built per adapter (float64, stored in the readout's dtype) whenever its plan is.

- **Merged** (``merge_adapter()``): ``M_p`` is ``[in, output_dim]`` with the scales folded in, and the pieces
  accumulate into one ``[batch, output_dim]`` tensor as they arrive.
- **Live**: the scales must stay in the graph, so ``M_p`` gives each piece's PCA scores (and, where a unit's weight
  differs from ``alpha``, its direct contribution); the readout multiplies the concatenated columns by the scales
  and reads them out in one product, as :func:`~.plan.readout` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..models import Architecture
from .config import ResiDualConfig
from .decomposition import frozen_norm
from .plan import LayerState, members


class PieceMap(NamedTuple):
    """What one piece adds: ``bias + x @ weight`` (``bias`` ``None`` for a merged piece after the first)."""

    weight: torch.Tensor
    """``[in, columns]``."""
    bias: torch.Tensor | None
    """``[columns]``."""


class Fold(NamedTuple):
    """One adapter's forward readout (see the module docstring), for a live or a merged adapter."""

    maps: dict[tuple[str, int | None], PieceMap]
    """Per piece ``(kind, layer)`` that adds anything, its map; the others are skipped."""
    merged: bool
    """Whether the maps carry the scales (their outputs accumulate), rather than columns read out at the end."""
    rows: torch.Tensor
    """Live: ``[columns, output_dim]``, per column of the concatenated piece outputs its component, or a row of the
    identity for a direct column. Merged: empty."""
    index: torch.Tensor
    """Live: per column, its scale's index in ``[*scales, 0, 1]`` (the direct columns take the 1)."""
    shift: torch.Tensor | None
    """Live: per column, added to its scale (``-1`` for a component whose unit keeps its remainder), if any is."""
    terms: torch.Tensor
    """Live: ``[2, columns]``, per column its coefficients of ``mu`` and of the constant."""
    constant: torch.Tensor
    """``[2, output_dim]``: ``v_mean`` and ``v_const``, the parts that do not depend on the scales (merged: all)."""
    tail: torch.Tensor
    """``[0, 1]``, appended to the scales before :attr:`index` picks from them."""
    base: bool
    """``alpha``: whether the model's own output is the start."""
    eps: float
    """The final norm's epsilon."""
    lambdas: torch.Tensor | None = None
    """Merged: the scales as merged, one per component in score order (for a forward that must take the
    output-space path)."""

    def add(self, key: tuple[str, int | None], piece: torch.Tensor, folded: object) -> object:
        """``folded`` (this pass's sum so far: a tensor when merged, a list of column blocks when live) after the
        piece ``key``, ``[batch, in]``."""
        piece_map = self.maps.get(key)
        if piece_map is None:
            return folded
        piece = piece.to(piece_map.weight.dtype)
        if self.merged:
            return torch.addmm(piece_map.bias if folded is None else folded, piece, piece_map.weight)
        return [*(folded or ()), torch.addmm(piece_map.bias, piece, piece_map.weight)]

    def output(
        self, folded: object, scales: list[torch.Tensor], residual: torch.Tensor, base_output: torch.Tensor
    ) -> torch.Tensor:
        """The adapted output of a pass from what its pieces folded into, the adapter's scales (unused when
        merged), the CLS residual entering the final norm and the model's own output at CLS."""
        dtype = self.constant.dtype
        if self.merged:
            summed, constant = folded, self.constant
        else:
            lambdas = torch.cat([*(scale.to(dtype) for scale in scales), self.tail])[self.index]
            if self.shift is not None:
                lambdas = lambdas + self.shift
            summed = (torch.cat(folded, 1) * lambdas) @ self.rows
            constant = torch.addmm(self.constant, self.terms * lambdas, self.rows)
        variance, mean = torch.var_mean(residual.to(dtype), -1, correction=0)
        centred = torch.addr(summed, mean, constant[0], alpha=-1)
        out = torch.addcmul(constant[1], centred, torch.rsqrt(variance + self.eps)[:, None])
        return out + base_output.to(dtype) if self.base else out


def _pieces(arch: Architecture) -> list[tuple[tuple[str, int | None], list[int]]]:
    """Every piece in the order a forward produces them, with the units it carries."""
    pieces = [(("embedding", None), [0])]
    for layer in range(arch.num_layers):
        pieces.append((("heads", layer), list(range(arch.num_units))[arch.heads_slice(layer)]))
        pieces.append((("mlps", layer), [arch.mlp_slice(layer).start]))
    return pieces


def _mapped_units(
    arch: Architecture, linear: torch.Tensor, kind: str, layer: int | None
) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Per unit of a piece ``x``, ``(columns, B, b)``: its raw contribution pushed through the frozen norm's linear
    part is ``B x[columns] + b`` (float64)."""
    if kind != "heads":
        return [(slice(0, arch.hidden_size), linear, torch.zeros(len(linear), dtype=torch.float64))]
    weight, bias, scale = (t if t is None else t.detach().double().cpu() for t in arch.head_map(layer, torch.float64))
    if scale is not None:
        weight, bias = scale[:, None, None] * weight, None if bias is None else scale * bias
    mapped = torch.einsum("oh,hnk->nok", linear, weight)
    bias = torch.zeros(len(linear), dtype=torch.float64) if bias is None else linear @ bias
    head_dim = arch.head_dim
    return [(slice(h * head_dim, (h + 1) * head_dim), mapped[h], bias) for h in range(arch.num_heads)]


@torch.no_grad()
def build_fold(
    layers: list[LayerState],
    config: ResiDualConfig,
    arch: Architecture,
    device: torch.device,
    dtype: torch.dtype,
    scales: torch.Tensor | None = None,
    snapshot: torch.Tensor | None = None,
) -> Fold:
    """The :class:`Fold` of a fitted adapter from every unit layer's state (as :func:`~.plan.build_plan` takes
    them), built in float64 and stored in ``dtype`` on ``device``: live, or merged with ``scales`` (the adapter's
    scales concatenated, as they are now; ``snapshot``, the same one per component in score order, is kept as
    :attr:`Fold.lambdas`)."""
    transformed, weights, replaced, num_scales = members(layers, config, arch)
    by_unit = {member.unit: member for group in transformed.values() for member in group}
    linear, mean_direction, offset = frozen_norm(arch, config.ln_mean)
    shares = arch.bias_shares
    pieces = [(key, units, _mapped_units(arch, linear, *key)) for key, units in _pieces(arch)]
    # alpha: start from the model's own output where that leaves fewer pieces to fold, then fewer columns
    costs = {}
    for alpha in (0.0, 1.0):
        direct = [any(float(weights[u]) != alpha for u in units) for _, units, _ in pieces]
        carried = [any(u in by_unit for u in units) for _, units, _ in pieces]
        costs[alpha] = (sum(d or c for d, c in zip(direct, carried, strict=True)) + alpha, sum(direct))
    alpha = min(costs, key=costs.get)
    dim, one = arch.output_dim, num_scales + 1
    maps, rows, index, shift, terms = {}, [], [], [], []
    constant = torch.stack([torch.zeros(dim, dtype=torch.float64), replaced.clone()])
    for key, units, raw in pieces:
        weight, bias = [], []
        direct_weight = torch.zeros(dim, raw[-1][0].stop, dtype=torch.float64)
        direct_bias, has_direct = torch.zeros(dim, dtype=torch.float64), False
        for unit, (columns, mapped, mapped_bias) in zip(units, raw, strict=True):
            share, difference = float(shares[unit]), float(weights[unit]) - alpha
            if difference:
                has_direct = True
                direct_weight[:, columns] += difference * mapped
                direct_bias += difference * mapped_bias
                constant += difference * share * torch.stack([mean_direction, offset])
            member = by_unit.get(unit)
            if member is None:
                continue
            scores = torch.zeros(len(member.rows), direct_weight.shape[1], dtype=torch.float64)
            scores[:, columns] = member.rows @ mapped
            weight.append(scores)
            bias.append(member.rows @ mapped_bias)
            rows.append(member.rows)
            index.append(member.scales)
            shift.append(torch.full((len(member.rows),), -1.0 if config.remainder == "keep" else 0.0))
            share_rows = member.rows @ (share * offset - member.mean)
            terms.append(torch.stack([share * member.rows @ mean_direction, share_rows]))
        if has_direct:
            weight.append(direct_weight)
            bias.append(direct_bias)
            rows.append(torch.eye(dim, dtype=torch.float64))
            index.append(torch.full((dim,), one))
            shift.append(torch.zeros(dim, dtype=torch.float64))
            terms.append(torch.zeros(2, dim, dtype=torch.float64))
        if weight:
            maps[key] = PieceMap(torch.cat(weight).T, torch.cat(bias))
    rows, index = torch.cat(rows), torch.cat(index)
    shift, terms = torch.cat(shift), torch.cat(terms, 1)
    tail = torch.tensor([0.0, 1.0], dtype=torch.float64)
    eps = float(arch.final_norm.eps)

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device, dtype)

    if scales is None:
        return Fold(
            maps={key: PieceMap(cast(m.weight), cast(m.bias)) for key, m in maps.items()},
            merged=False, rows=cast(rows), index=index.to(device), shift=cast(shift) if shift.any() else None,
            terms=cast(terms), constant=cast(constant), tail=cast(tail), base=bool(alpha), eps=eps,
        )  # fmt: skip
    # merged: each piece's columns read out through their components now, the biases summed into the first map
    per_column = torch.cat([scales.detach().double().cpu(), tail])[index] + shift
    readout_rows = per_column[:, None] * rows
    folded, start, bias = {}, 0, torch.zeros(dim, dtype=torch.float64)
    for key, piece_map in maps.items():
        block = readout_rows[start : start + piece_map.weight.shape[1]]
        start += piece_map.weight.shape[1]
        folded[key] = piece_map.weight @ block
        bias += piece_map.bias @ block
    first = next(iter(folded), None)
    empty = torch.zeros(0, dim)
    return Fold(
        maps={key: PieceMap(cast(weight), cast(bias) if key == first else None) for key, weight in folded.items()},
        merged=True, rows=cast(empty), index=index[:0].to(device), shift=None, terms=cast(torch.zeros(2, 0)),
        constant=cast(constant + terms @ readout_rows), tail=cast(tail), base=bool(alpha), eps=eps,
        lambdas=cast(snapshot),
    )  # fmt: skip
