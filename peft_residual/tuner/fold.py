"""The forward's readout: each unit piece is folded into its adapter's output the moment its module produces it.

At frozen final-norm statistics (``r`` the CLS residual entering the norm, ``mu`` its mean, ``sigma`` its standard
deviation) a unit with raw contribution ``v`` and bias share ``s`` contributes ``c = (N v - s mu n) / sigma + s t``
(:func:`~.decomposition.frozen_norm`), and the adapter makes it ``w c + Phi^T diag(lambda) Phi (c - m)`` (``w`` 1
for a unit added unchanged or keeping its remainder, else 0). Summed, with ``alpha`` 1 where starting from the
model's own output ``y`` saves ops:

    ``out = alpha y + (sum_p x_p M_p - mu v_mean) / sigma + v_const``

with ``x_p`` one piece at CLS as its module produced it (the embedding, a layer's heads entering the output
projection, an MLP's output). A forward thus adds about one op per piece that carries a transformed unit, and keeps
no piece. **Merged**, ``M_p`` holds the scales: the pieces are staged side by side and read out by one product at the
end. **Live**, each piece gives its PCA scores (a layer's heads in one ``baddbmm``), and the scales read them out at
the end in one product, as :func:`~.plan.readout` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..models import Architecture
from .config import ResiDualConfig
from .decomposition import frozen_norm
from .head_space import mapped_heads
from .plan import LayerState, Member, members


class PieceMap(NamedTuple):
    """What one piece ``x`` ``[batch, in]`` adds to its pass's fold."""

    weight: torch.Tensor | None
    """``x @ weight + bias``: ``[in, columns]``, or per head ``[heads, head_dim, width]`` (a live fold's heads);
    ``None``: no scores."""
    bias: torch.Tensor | None
    """``[columns]`` (``[heads, 1, width]`` per head); merged: ``None`` (see :attr:`Fold.bias`)."""
    raw: torch.Tensor | None = None
    """Live: ``[hidden]``, the weight of the piece's direct part on what its module adds to the residual stream,
    summed there and pushed through the norm once."""


class Live(NamedTuple):
    """What a live pass's pieces folded into so far."""

    heads: list[torch.Tensor]
    """Per layer of heads, their scores ``[heads, batch, width]``."""
    columns: list[torch.Tensor]
    """Other scores (and direct columns), ``[batch, columns]``."""
    raw: torch.Tensor | None
    """The direct parts, summed in the residual's space ``[batch, hidden]``."""


class Fold(NamedTuple):
    """One adapter's forward readout (see the module docstring), for a live or a merged adapter."""

    maps: dict[tuple[str, int | None], PieceMap]
    """Per piece ``(kind, layer)`` that adds anything, its map; the others are skipped."""
    merged: bool
    """Whether the maps carry the scales, rather than giving columns the live scales read out at the end."""
    rows: torch.Tensor
    """Live: ``[output_dim, columns]``, per column (heads first) its component, or an identity row for a direct
    column. Merged: ``[output_dim, in]``, the staged pieces' maps with the scales folded in. Stored so, each output's
    weights are one long run of memory, which a CPU streams twice as fast as short rows."""
    index: torch.Tensor
    """Live: per column, its scale's index in ``[*scales, 0, 1]`` (padding takes the 0, direct columns the 1)."""
    shift: torch.Tensor | None
    """Live: per column, added to its scale (``-1`` for a component whose unit keeps its remainder), if any is."""
    terms: torch.Tensor
    """Live: ``[2, columns]``, per column its coefficients of ``mu`` and of the constant."""
    raw_map: torch.Tensor | None
    """Live: ``N^T`` ``[hidden, output_dim]``, for the direct parts summed in the residual's space."""
    constant: torch.Tensor
    """``[2, output_dim]``: ``v_mean`` and ``v_const``, the parts that do not depend on the scales (merged: all)."""
    tail: torch.Tensor
    """``[0, 1]``, appended to the scales before :attr:`index` picks from them."""
    base: bool
    """``alpha``: whether the model's own output is the start (the caller adds it: :meth:`output` leaves it out)."""
    eps: float
    """The final norm's epsilon."""
    lambdas: torch.Tensor | None = None
    """Merged: the scales as merged, one per component in score order (for a forward that must take the
    output-space path)."""
    slots: dict[tuple[str, int | None], slice] | None = None
    """Merged: per piece, its columns among the pass's staged pieces ``[batch, in]``, all read out by one product
    at the end (one long run of memory, where a product per piece makes many short ones)."""
    bias: torch.Tensor | None = None
    """Merged: ``[output_dim]``, the pieces' biases through their maps."""

    def add(self, key: tuple[str, int | None], piece: torch.Tensor, output: torch.Tensor, folded: object) -> object:
        """``folded`` (this pass's fold so far: the staged pieces when merged, a :class:`Live` when live) after the
        piece ``key`` ``[batch, in]``, whose module's ``output`` ``[batch, tokens, hidden]`` adds to the residual stream
        (before any layer scale; read at CLS only by a live piece with a direct part)."""
        piece_map = self.maps.get(key)
        if piece_map is None:
            return folded
        if self.merged:  # staged, for one product at the end (see slots)
            staged = piece.new_empty(len(piece), self.rows.shape[1]) if folded is None else folded
            staged[:, self.slots[key]].copy_(piece)
            return staged
        heads, columns, raw = folded if folded is not None else ([], [], None)
        weight = piece_map.weight
        if weight is not None and weight.dim() == 3:  # per head: [heads, batch, head_dim] @ [heads, head_dim, width]
            heads = [
                *heads,
                torch.baddbmm(piece_map.bias, piece.view(len(piece), *weight.shape[:2]).transpose(0, 1), weight),
            ]
        elif weight is not None:
            columns = [*columns, torch.addmm(piece_map.bias, piece, weight)]
        if piece_map.raw is not None:
            added = output[:, 0]
            raw = added * piece_map.raw if raw is None else torch.addcmul(raw, added, piece_map.raw)
        return Live(heads, columns, raw)

    def output(self, folded: object, scales: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        """The adapted output of a pass (less the model's own output, which the caller adds where :attr:`base`) from
        what its pieces folded into, the adapter's scales (unused when merged) and the CLS residual entering the
        final norm."""
        dtype = self.constant.dtype
        inverse_std, mean = _statistics(residual.to(dtype), self.eps)
        if self.merged:
            folded = torch.addmm(self.bias, folded, self.rows.T)
            return torch.addcmul(self.constant[1], torch.addr(folded, mean, self.constant[0], alpha=-1), inverse_std)
        lambdas = torch.cat([*(scale.to(dtype) for scale in scales), self.tail])[self.index]
        if self.shift is not None:
            lambdas = lambdas + self.shift
        blocks = list(folded.columns)
        if folded.heads:  # [layers * heads, batch, width] as [batch, layers * heads * width]
            heads = torch.cat(folded.heads)
            blocks.insert(0, heads.permute(1, 0, 2).reshape(heads.shape[1], -1))
        scores = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
        # the scores at this sample's statistics first, so that the components are read once, in a product of one
        # row per sample (a CPU streams them for each row of a small product: two rows cost twice one)
        scores = torch.addcmul(self.terms[1], torch.addr(scores, mean, self.terms[0], alpha=-1), inverse_std)
        out = torch.addmm(self.constant[1], scores * lambdas, self.rows.T)
        if self.raw_map is not None:  # the direct parts summed in the residual's space, through the norm at once
            direct = torch.addr(folded.raw @ self.raw_map, mean, self.constant[0], alpha=-1)
            out = torch.addcmul(out, direct, inverse_std)
        return out


def _statistics(residual: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm's ``1 / sqrt(var + eps)`` ``[batch, 1]`` and mean ``[batch]`` of ``residual``: in one kernel,
    the norm's own, where no gradient can flow (its mean and inverse std are not differentiable outputs), else in the
    three differentiable ops."""
    if not residual.requires_grad:
        _, mean, inverse_std = torch.native_layer_norm(residual, residual.shape[-1:], None, None, eps)
        return inverse_std, mean.view(-1)
    variance, mean = torch.var_mean(residual, -1, correction=0)
    return torch.rsqrt(variance + eps)[:, None], mean


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
    mapped, bias = mapped_heads(arch, layer, linear)
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
    norm = _Norm(*frozen_norm(arch, config.ln_mean), arch.bias_shares, config.remainder == "keep", num_scales)
    dim, live = arch.output_dim, scales is None
    pieces = [(key, units, _mapped_units(arch, norm.linear, *key)) for key, units in _pieces(arch)]
    # alpha: start from the model's own output where that leaves fewer ops, then (merged) fewer maps to stream,
    # (live) fewer live ops
    costs = {}
    for alpha in (0.0, 1.0):
        direct = [any(float(weights[u]) != alpha for u in units) for _, units, _ in pieces]
        carried = [any(u in by_unit for u in units) for _, units, _ in pieces]
        maps = sum(d or c for d, c in zip(direct, carried, strict=True))
        costs[alpha] = (maps + alpha, sum(direct) + sum(carried) if live else maps)
    alpha = min(costs, key=costs.get)
    constant = torch.stack([torch.zeros(dim, dtype=torch.float64), replaced.clone()])
    heads_columns, other_columns = _Columns(), _Columns()
    head_units = {u for layer in range(arch.num_layers) for u in range(arch.num_units)[arch.heads_slice(layer)]}
    width = max((len(member.rows) for unit, member in by_unit.items() if unit in head_units), default=0)
    maps: dict[tuple[str, int | None], PieceMap] = {}
    for key, units, mapped_units in pieces:
        differences = [float(weights[unit]) - alpha for unit in units]
        if not any(differences) and not any(unit in by_unit for unit in units):
            continue
        if live and len(set(differences)) == 1:  # one weight for the whole direct part: summed as raw pieces
            for unit, difference in zip(units, differences, strict=True):  # whose constant terms are the fold's
                constant += difference * float(norm.shares[unit]) * torch.stack([norm.mean_direction, norm.offset])
            columns = heads_columns if key[0] == "heads" else other_columns
            maps[key] = _live_map(key, units, mapped_units, differences[0], by_unit, width, arch, norm, columns)
        else:
            maps[key] = _dense_map(units, mapped_units, differences, by_unit, dim, norm, other_columns)
    rows, index, shift, terms = heads_columns.joined(other_columns, dim)
    tail = torch.tensor([0.0, 1.0], dtype=torch.float64)
    eps = float(arch.final_norm.eps)

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device, dtype)

    if live:
        uses_raw = any(piece_map.raw is not None for piece_map in maps.values())
        return Fold(
            maps={key: PieceMap(*(cast(t) for t in piece_map)) for key, piece_map in maps.items()},
            merged=False, rows=cast(rows.T.contiguous()), index=index.to(device),
            shift=cast(shift) if shift.any() else None, terms=cast(terms),
            raw_map=cast(norm.linear.T) if uses_raw else None, constant=cast(constant), tail=cast(tail),
            base=bool(alpha), eps=eps,
        )  # fmt: skip
    # merged: each piece's columns read out through their components now, its map a block of one [output_dim, in]
    per_column = torch.cat([scales.detach().double().cpu(), tail])[index] + shift
    readout_rows = per_column[:, None] * rows
    blocks, slots, column, staged, bias = [], {}, 0, 0, torch.zeros(dim, dtype=torch.float64)
    for key, piece_map in maps.items():
        inputs, width = piece_map.weight.shape
        block = readout_rows[column : column + width]
        blocks.append((piece_map.weight @ block).T)
        bias += piece_map.bias @ block
        slots[key] = slice(staged, staged + inputs)
        column, staged = column + width, staged + inputs
    stacked = cast(torch.cat(blocks or [torch.zeros(dim, 0, dtype=torch.float64)], 1))
    return Fold(
        maps={key: PieceMap(stacked[:, slot].T, None) for key, slot in slots.items()},
        merged=True, rows=stacked, index=index[:0].to(device), shift=None, terms=cast(torch.zeros(2, 0)),
        raw_map=None, constant=cast(constant + terms @ readout_rows), tail=cast(tail), base=bool(alpha), eps=eps,
        lambdas=cast(snapshot), slots=slots, bias=cast(bias),
    )  # fmt: skip


class _Norm(NamedTuple):
    """The frozen norm (:func:`~.decomposition.frozen_norm`) and what the columns of one adapter read of it."""

    linear: torch.Tensor
    mean_direction: torch.Tensor
    offset: torch.Tensor
    shares: torch.Tensor
    keep: bool
    """Whether transformed units keep their remainder (their scales shift by -1)."""
    num_scales: int
    """The index of the appended 0 among the scales (the 1 follows it)."""


class _Columns:
    """Per column of a live fold's scores, in order: its row of :attr:`Fold.rows`, scale index, shift and terms."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def component(self, member: Member | None, share: float, norm: _Norm, width: int | None = None) -> None:
        """A transformed unit's components (``None``: no unit), zero-padded to ``width`` columns if given."""
        rows = member.rows if member is not None else torch.zeros(0, len(norm.linear), dtype=torch.float64)
        index = member.scales if member is not None else torch.zeros(0, dtype=torch.long)
        shift = torch.full((len(rows),), -1.0 if norm.keep else 0.0, dtype=torch.float64)
        mean = member.mean if member is not None else torch.zeros(len(norm.linear), dtype=torch.float64)
        terms = torch.stack([share * rows @ norm.mean_direction, rows @ (share * norm.offset - mean)])
        padding = 0 if width is None else width - len(rows)
        self.parts.append(
            (
                torch.cat([rows, rows.new_zeros(padding, rows.shape[1])]),
                torch.cat([index, torch.full((padding,), norm.num_scales)]),
                torch.cat([shift, shift.new_zeros(padding)]),
                torch.cat([terms, terms.new_zeros(2, padding)], 1),
            )
        )

    def identity(self, terms: torch.Tensor, norm: _Norm) -> None:
        """Direct columns with their ``terms``, read out unscaled (they take the 1 appended to the scales)."""
        dim = terms.shape[1]
        rows, index = torch.eye(dim, dtype=torch.float64), torch.full((dim,), norm.num_scales + 1)
        self.parts.append((rows, index, torch.zeros(dim, dtype=torch.float64), terms))

    def joined(self, after: _Columns, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, index, shift, terms)`` of these columns, then ``after``'s."""
        parts = self.parts + after.parts
        if not parts:
            return (
                torch.zeros(0, dim, dtype=torch.float64),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.float64),
                torch.zeros(2, 0, dtype=torch.float64),
            )
        rows, index, shift, terms = zip(*parts, strict=True)
        return torch.cat(rows), torch.cat(index), torch.cat(shift), torch.cat(terms, 1)


def _dense_map(units, mapped_units, differences, by_unit, dim: int, norm: _Norm, columns: _Columns) -> PieceMap:
    """A piece's scores and, where a unit's weight differs from the fold's start, its direct contribution as
    identity columns, in one ``[in, columns]`` map."""
    width = mapped_units[-1][0].stop
    weight, bias = [], []
    direct_weight = torch.zeros(dim, width, dtype=torch.float64)
    direct_bias = torch.zeros(dim, dtype=torch.float64)
    direct_terms = torch.zeros(2, dim, dtype=torch.float64)
    for unit, difference, (columns_of_x, mapped, mapped_bias) in zip(units, differences, mapped_units, strict=True):
        direct_weight[:, columns_of_x] += difference * mapped
        direct_bias += difference * mapped_bias
        direct_terms += difference * float(norm.shares[unit]) * torch.stack([norm.mean_direction, norm.offset])
        member = by_unit.get(unit)
        if member is None:
            continue
        scores = torch.zeros(len(member.rows), width, dtype=torch.float64)
        scores[:, columns_of_x] = member.rows @ mapped
        weight.append(scores)
        bias.append(member.rows @ mapped_bias)
        columns.component(member, float(norm.shares[unit]), norm)
    if any(differences):
        weight.append(direct_weight)
        bias.append(direct_bias)
        columns.identity(direct_terms, norm)
    return PieceMap(torch.cat(weight).T, torch.cat(bias))


def _live_map(
    key, units, mapped_units, difference: float, by_unit, width: int, arch: Architecture, norm: _Norm, columns: _Columns
) -> PieceMap:
    """A live piece whose units share one weight for the direct part: its scores (per head for heads) and that
    weight on what the piece adds to the residual stream."""
    raw = None
    if difference:
        scale = arch.attention_layer_scale(key[1]) if key[0] == "heads" else None
        scale = torch.ones(arch.hidden_size, dtype=torch.float64) if scale is None else scale.detach().double().cpu()
        raw = difference * scale
    members = [by_unit.get(unit) for unit in units]
    if not any(member is not None for member in members):
        return PieceMap(None, None, raw)
    if key[0] != "heads":
        (member,), (_, mapped, mapped_bias) = members, mapped_units[0]
        columns.component(member, float(norm.shares[units[0]]), norm)
        return PieceMap((member.rows @ mapped).T, member.rows @ mapped_bias, raw)
    kernel = torch.zeros(len(units), arch.head_dim, width, dtype=torch.float64)
    bias = torch.zeros(len(units), 1, width, dtype=torch.float64)
    for head, (unit, member, (_, mapped, mapped_bias)) in enumerate(zip(units, members, mapped_units, strict=True)):
        if member is not None:
            kernel[head, :, : len(member.rows)] = (member.rows @ mapped).T
            bias[head, 0, : len(member.rows)] = member.rows @ mapped_bias
        columns.component(member, float(norm.shares[unit]), norm, width)
    return PieceMap(kernel, bias, raw)
