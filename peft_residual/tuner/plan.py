"""The readout formula, and each adapter's readout plan: everything a forward needs beyond the scales.

Every path computes the adapted output with :func:`readout`, ``offset + (scores * lambda) @ basis``. The plan fixes
the shapes once per fit, load, move or adapter switch, so a forward has no data-dependent control flow. It computes
scores in one of two ways, equal up to float rounding:

- from unit contributions in output space (:meth:`ReadoutPlan.scores`), the form the training cache stores;
- from the raw CLS pieces (:func:`adapt_from_pieces`), the form a forward uses: a head's scores follow from its
  output ``z`` through a small kernel ``Phi Q R`` (see :mod:`.head_space`), and the units the scales do not touch are
  pushed through the final norm as one weighted sum, so no unit's output-space contribution is ever built except the
  transformed MLPs'. The kernel holds the base weights as they were when the plan was built; a forward that needs
  gradients for those weights takes the first form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..models import Architecture
from .config import ResiDualConfig
from .decomposition import UnitRecord, linearise, norm_statistics
from .head_space import HeadFrames

TILE = 32
"""Samples per product in the tiled form of :func:`readout`. A float32 product's rounding depends on its shape, so
every product is one tile of exactly this many samples (zero-padded), and processes share a cached batch by whole
tiles: each sample's arithmetic is then the same for any number of processes. Smaller tiles would spread a batch of
64 over more processes, but they stream the basis once per tile: at 16 the products already lose half their speed
on a CPU."""


def _tiled(rows: torch.Tensor) -> torch.Tensor:
    """``[n, c]`` as ``[ceil(n / TILE), TILE, c]``, the last tile padded with zeros."""
    if len(rows) % TILE:
        rows = F.pad(rows, (0, 0, 0, TILE - len(rows) % TILE))
    return rows.view(-1, TILE, rows.shape[-1])


class _TiledReadout(torch.autograd.Function):
    """:func:`readout` in ``lambdas``' dtype, the products tile by tile in ``basis``' dtype; the gradient reaches
    ``lambdas`` only (the cached training path)."""

    @staticmethod
    def forward(ctx, scores, lambdas, basis, offset):
        tiles = _tiled(scores.to(basis.dtype))
        products = torch.bmm(tiles * lambdas.to(basis.dtype), basis.expand(len(tiles), *basis.shape))
        ctx.save_for_backward(tiles, basis)
        return offset.to(lambdas.dtype) + products.flatten(0, 1)[: len(scores)].to(lambdas.dtype)

    @staticmethod
    def backward(ctx, grad):
        tiles, basis = ctx.saved_tensors
        projected = torch.bmm(basis.expand(len(tiles), *basis.shape), _tiled(grad.to(basis.dtype)).transpose(1, 2))
        per_tile = torch.sum(projected * tiles.transpose(1, 2), 2, dtype=grad.dtype)
        return None, per_tile.sum(0), None, None


def readout(
    scores: torch.Tensor, lambdas: torch.Tensor, basis: torch.Tensor, offset: torch.Tensor, tiled: bool = False
) -> torch.Tensor:
    """The adapted output ``offset + (scores * lambdas) @ basis`` of ``scores [batch, c]``, ``lambdas [c]`` and
    ``basis [c, dim]``.

    ``tiled=True`` is the training form: the result and the gradient are in ``lambdas``' dtype (float64 there) while
    the products run in ``basis``' dtype (float32) one :data:`TILE` of samples at a time, so that a sample's bits do
    not depend on how a batch is split among processes.

    Example:
        >>> out = readout(scores, lambdas, basis, offset)  # [batch, dim]
    """
    if tiled:
        return _TiledReadout.apply(scores, lambdas, basis, offset)
    return torch.addmm(offset, scores * lambdas, basis)


class OutputSpace(NamedTuple):
    """A unit layer's fitted state in output space, float64 on the CPU."""

    mean: torch.Tensor
    """``[units, output_dim]``."""
    basis: torch.Tensor
    """Every unit's orthonormal components, concatenated, ``[sum(rank), output_dim]``."""
    rank: list[int]
    """Components per unit (0 for a unit that is not transformed)."""
    frames: HeadFrames | None = None
    """The head coordinates, for a layer of heads."""

    @property
    def rows(self) -> tuple[torch.Tensor, ...]:
        """Per unit, its components ``[rank, output_dim]``."""
        return self.basis.split(self.rank)


TREATMENTS = ("transform", "sum", "mean", "zero")
"""What an adapter does with a unit: transform it, add it unchanged, replace it by its mean, or drop it (the last
three are ``ResiDualConfig.rest``)."""


class LayerState(NamedTuple):
    """What a readout plan reads of one unit layer for one adapter (``ResiDualUnitLayer.plan_state``)."""

    kind: str
    """``"embedding"``, ``"heads"`` or ``"mlps"``."""
    start: int
    """The index of its first unit."""
    treatments: tuple[str, ...]
    """Per unit, one of :data:`TREATMENTS`."""
    space: OutputSpace | None
    """Its fitted state, where it stores one (a unit transformed or replaced by its mean)."""


class HeadScores(NamedTuple):
    """The PCA scores of the transformed heads from their outputs ``z``: with ``x = [z; 1] / sigma``,
    ``scores = kernel z / sigma + (one - mean(r) * mean) / sigma + constant``, all padded to the group's width."""

    heads: torch.Tensor
    """``[n]``: each head's index among all heads, ``layer * num_heads + head``."""
    kernel: torch.Tensor
    """``[n, k, head_dim]``."""
    one: torch.Tensor
    """``[n, k]``."""
    mean: torch.Tensor
    """``[n, k]``: the shared norm mean's direction, times the head's share (zero for ``ln_mean="unit"``)."""
    constant: torch.Tensor
    """``[n, k]``."""

    def scores(self, head_outputs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``[batch, n * k]`` from ``head_outputs [batch, heads, head_dim]`` and the norm's statistics."""
        picked = head_outputs.index_select(1, self.heads).transpose(0, 1)
        products = torch.bmm(picked, self.kernel.transpose(1, 2)).transpose(0, 1)
        scores = (products + self.one - mean[:, None, None] * self.mean) / std[:, None, None] + self.constant
        return scores.flatten(1)


class RawWeights(NamedTuple):
    """The weights of :attr:`ReadoutPlan.sum_weight` on the raw pieces, so that the untouched units enter the final
    norm as one weighted sum."""

    embedding: torch.Tensor
    """Scalar."""
    attention: torch.Tensor
    """``[layers]``: the weight of a layer's whole attention output, for layers whose heads share one weight."""
    uneven: tuple[tuple[int, torch.Tensor], ...]
    """``(layer, weights [heads])`` for layers whose heads weigh differently."""
    mlps: torch.Tensor
    """``[layers]``."""
    shares: torch.Tensor
    """``[1 + transformed MLPs]``: the norm's shares of the weighted sum and of each transformed MLP."""


class ReadoutPlan(NamedTuple):
    """Everything one adapter's forward needs beyond the scales, with static shapes.

    The transformed units are gathered in groups of one kind (heads first, then MLPs), each padded to its largest
    rank, so that their scores are one batched product per group; padding rows are zero and take a zero scale.
    """

    groups: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    """Per group: unit indices ``[n]``, means ``[n, dim]`` (zero when uncentred) and padded bases ``[n, k, dim]``
    (views into :attr:`basis`)."""
    basis: torch.Tensor
    """All padded components, ``[slots, dim]``."""
    lambda_index: torch.Tensor
    """Per slot, which scale of the concatenated ``residual_lambda`` it takes; padding takes the extra zero."""
    lambda_shift: torch.Tensor
    """Per slot, added to its scale: ``-1`` for components whose unit keeps its remainder (``remainder="keep"``)."""
    components: torch.Tensor
    """The slots that hold a component, in score order (the training cache's scores)."""
    sum_weight: torch.Tensor
    """Per unit, 1 where its contribution is added unchanged."""
    constant: torch.Tensor
    """``[dim]``: the means that replace units, minus those of units that keep their remainder."""
    head_scores: HeadScores | None
    """The heads group's scores from the head outputs, if heads are transformed."""
    mlp_layers: torch.Tensor
    """``[n]``: the layers whose MLP is transformed (the MLP group, last)."""
    raw_weights: RawWeights

    def scores(self, contributions: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        """Padded PCA scores ``[batch, slots]`` of unit contributions ``[batch, units, dim]`` (of the first
        ``groups`` groups only, if given)."""
        return torch.cat(
            [
                _group_scores(contributions.index_select(1, units), mean, basis)
                for units, mean, basis in self.groups[:groups]
            ]
            or [contributions.new_zeros(len(contributions), 0)],
            dim=1,
        )

    def offset(self, contributions: torch.Tensor) -> torch.Tensor:
        """The part of the output no scale touches, before any kept remainder."""
        return torch.einsum("bnd,n->bd", contributions, self.sum_weight) + self.constant

    def in_score_order(self) -> Components:
        """The components in score order, without padding, and which scale each takes."""
        index = self.lambda_index[self.components]
        identity = torch.equal(index, torch.arange(len(index), device=index.device))
        return Components(self.basis[self.components], None if identity else index)


class Components(NamedTuple):
    """An adapter's components in score order (the training cache's scores) and which of its scales each takes."""

    basis: torch.Tensor
    """``[components, output_dim]``."""
    scale_index: torch.Tensor | None
    """Per component, its scale's index among the adapter's concatenated scales (``None``: one scale per component,
    in order)."""

    def scales(self, scales: torch.Tensor) -> torch.Tensor:
        """One scale per component from the adapter's concatenated ``scales``: the one map from scales to
        components (a forward's padded slots follow :attr:`ReadoutPlan.lambda_index`)."""
        return scales if self.scale_index is None else scales[self.scale_index]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Components:
        index = None if self.scale_index is None else self.scale_index.to(device)
        return Components(self.basis.to(device, dtype), index)


def _group_scores(contributions: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``[batch, n * k]``: one ``[batch, dim] @ [dim, k]`` product per unit of a group, batched."""
    return torch.bmm((contributions - mean).transpose(0, 1), basis.transpose(1, 2)).transpose(0, 1).flatten(1)


class ReadoutScales(NamedTuple):
    """The scales a forward reads out with: an adapter's live scales, or the fold :func:`fold_scales` made of them
    when it was merged (``merge_adapter()``)."""

    lambdas: torch.Tensor
    """Per input column of :func:`readout`."""
    basis: torch.Tensor
    """``[columns, dim]``."""
    constant: torch.Tensor | None = None
    """``[dim]``, added to the output."""
    dense_mlps: bool = False
    """Whether each transformed MLP is read out through its dense map ``Phi^T diag(lambda) Phi`` from its
    contribution, rather than scored against its basis and read out through it again."""


@torch.no_grad()
def fold_scales(plan: ReadoutPlan, lambdas: torch.Tensor) -> ReadoutScales:
    """``plan``'s padded ``lambdas`` as they are now, with each transformed MLP's folded into a dense map (built in
    float64) where that pays: an MLP with more than ``dim / 2`` components then costs one read of a ``dim x dim``
    map instead of two of its basis. Heads keep their factored form, already the smaller one."""
    if not len(plan.mlp_layers) or 2 * plan.groups[-1][2].shape[1] <= plan.basis.shape[1]:
        return ReadoutScales(lambdas.clone(), plan.basis)
    _, mean, basis = plan.groups[-1]
    mlps, width, dim = basis.shape
    start = len(plan.basis) - mlps * width
    scaled = basis.double() * lambdas[start:].double().view(mlps, width, 1)
    maps = torch.bmm(basis.double().transpose(1, 2), scaled)
    return ReadoutScales(
        lambdas=torch.cat([lambdas[:start], lambdas.new_ones(mlps * dim)]),
        basis=torch.cat([plan.basis[:start], maps.flatten(0, 1).to(plan.basis.dtype)]),
        constant=-torch.einsum("nd,nde->e", mean.double(), maps).to(plan.basis.dtype),
        dense_mlps=True,
    )


def read_out(
    plan: ReadoutPlan,
    scales: ReadoutScales,
    head_scores: torch.Tensor,
    mlp_contributions: torch.Tensor | None,
    offset: torch.Tensor,
) -> torch.Tensor:
    """The adapted output from the transformed heads' padded scores ``[batch, slots]``, the transformed MLPs'
    contributions ``[batch, mlps, dim]`` (``None`` when none are) and the untouched part ``offset``."""
    inputs = [head_scores]
    if len(plan.mlp_layers):
        _, mean, basis = plan.groups[-1]
        dense = scales.dense_mlps
        inputs.append(mlp_contributions.flatten(1) if dense else _group_scores(mlp_contributions, mean, basis))
    if scales.constant is not None:
        offset = offset + scales.constant
    return readout(torch.cat(inputs, 1), scales.lambdas, scales.basis, offset)


def adapt_from_pieces(
    plan: ReadoutPlan, record: UnitRecord, arch: Architecture, ln_mean: str, scales: ReadoutScales
) -> torch.Tensor:
    """The adapted output straight from one forward's raw pieces (see the module docstring)."""
    dtype = plan.basis.dtype
    embedding = record.embedding.to(dtype)
    head_outputs = record.per_layer("heads", arch.num_layers).to(dtype)
    attention = record.per_layer("attention", arch.num_layers).to(dtype)
    layer_scales = arch.attention_layer_scales
    if layer_scales is not None:
        attention = attention * layer_scales.to(dtype)
    mlps = record.per_layer("mlps", arch.num_layers).to(dtype)
    residual = embedding + attention.sum(1) + mlps.sum(1)
    weights = plan.raw_weights
    untouched = weights.embedding * embedding + torch.einsum("bld,l->bd", attention, weights.attention)
    untouched = untouched + torch.einsum("bld,l->bd", mlps, weights.mlps)
    for layer, head_weights in weights.uneven:
        per_head = arch.head_contributions(layer, head_outputs[:, layer])
        untouched = untouched + torch.einsum("bhd,h->bd", per_head, head_weights)
    units = torch.cat([untouched[:, None], mlps.index_select(1, plan.mlp_layers)], 1)
    contributions = linearise(units, arch, ln_mean, residual, weights.shares)
    head_scores = contributions.new_zeros(len(residual), 0)
    if plan.head_scores is not None:
        mean, std = norm_statistics(residual, arch.final_norm.eps)
        heads = head_outputs.reshape(len(residual), arch.num_layers * arch.num_heads, arch.head_dim)
        head_scores = plan.head_scores.scores(heads, mean, std)
    return read_out(plan, scales, head_scores, contributions[:, 1:], contributions[:, 0] + plan.constant)


class _Member(NamedTuple):
    unit: int
    mean: torch.Tensor
    rows: torch.Tensor
    scales: torch.Tensor
    """Which scale each row takes."""
    kernel: torch.Tensor | None = None
    """For a head, ``rows Q R`` ``[rank, columns]``: its scores from ``x`` (see :class:`HeadScores`)."""
    constant: torch.Tensor | None = None
    """For a head, ``rows (t - mean)`` ``[rank]``."""


def _members(
    layers: list[LayerState], config: ResiDualConfig, arch: Architecture
) -> tuple[dict[str, list[_Member]], torch.Tensor, torch.Tensor, int]:
    """The transformed units by kind, the per-unit ``sum_weight``, the ``constant`` and the number of scales."""
    sum_weight = torch.zeros(arch.num_units, dtype=torch.float64)
    constant = torch.zeros(arch.output_dim, dtype=torch.float64)
    members: dict[str, list[_Member]] = {"heads": [], "mlps": []}
    num_scales, per_unit = 0, config.scale_per == "unit"
    for layer in layers:
        space = layer.space
        if set(layer.treatments) == {"mean"}:  # the whole layer replaced by its mean
            constant += space.mean.sum(0)
            continue
        rows_of = space.rows if space is not None else (None,) * len(layer.treatments)
        for unit, (treatment, rows) in enumerate(zip(layer.treatments, rows_of, strict=True)):
            index = layer.start + unit
            if treatment == "sum":
                sum_weight[index] = 1.0
            elif treatment == "mean":
                constant += space.mean[unit]
            if treatment != "transform":
                continue
            scales = torch.full((len(rows),), num_scales) if per_unit else num_scales + torch.arange(len(rows))
            num_scales += 1 if per_unit else len(rows)
            mean = space.mean[unit] if config.centre else torch.zeros_like(space.mean[unit])
            member = _Member(index, mean, rows, scales)
            if space.frames is not None:
                frames = space.frames
                kernel = rows @ frames.frames[unit] @ frames.triangular[unit]
                member = member._replace(kernel=kernel, constant=rows @ (frames.offset[unit] - mean))
            members[layer.kind].append(member)
            if config.remainder == "keep":
                sum_weight[index] = 1.0
                constant -= mean
    return members, sum_weight, constant, num_scales


def _layer_of(arch: Architecture, unit: int) -> int:
    return (unit - 1) // (arch.num_heads + 1)


def _head_scores(group: list[_Member], width: int, config: ResiDualConfig, arch: Architecture, cast) -> HeadScores:
    """The heads group's kernel, split into the columns of ``x = [z; 1; -s mean(r); sigma] / sigma``."""
    kernel = torch.zeros(len(group), width, group[0].kernel.shape[1], dtype=torch.float64)
    constant = torch.zeros(len(group), width, dtype=torch.float64)
    for position, member in enumerate(group):
        kernel[position, : len(member.rows)] = member.kernel
        constant[position, : len(member.rows)] = member.constant
    head_dim, shared = arch.head_dim, config.ln_mean == "shared"
    share = float(arch.bias_shares[group[0].unit])
    mean = kernel[:, :, head_dim + 1] * share if shared else torch.zeros_like(constant)
    if not config.centre:  # the offset is one more column, whose entry of x is 1
        constant = constant + kernel[:, :, -1]
    heads = [_layer_of(arch, m.unit) * arch.num_heads + (m.unit - 1) % (arch.num_heads + 1) for m in group]
    return HeadScores(
        heads=cast(torch.tensor(heads), None),
        kernel=cast(kernel[:, :, :head_dim]),
        one=cast(kernel[:, :, head_dim]),
        mean=cast(mean),
        constant=cast(constant),
    )


def _raw_weights(sum_weight: torch.Tensor, mlp_layers: list[int], arch: Architecture, cast) -> RawWeights:
    attention, uneven = torch.zeros(arch.num_layers, dtype=torch.float64), []
    for layer in range(arch.num_layers):
        weights = sum_weight[arch.heads_slice(layer)]
        if torch.all(weights == weights[0]):
            attention[layer] = weights[0]
        else:
            uneven.append((layer, cast(weights)))
    mlps = torch.stack([sum_weight[arch.mlp_slice(layer).start] for layer in range(arch.num_layers)])
    shares = arch.bias_shares
    mlp_shares = [shares[arch.mlp_slice(layer).start] for layer in mlp_layers]
    return RawWeights(
        embedding=cast(sum_weight[0]),
        attention=cast(attention),
        uneven=tuple(uneven),
        mlps=cast(mlps),
        shares=cast(torch.stack([(sum_weight * shares).sum(), *mlp_shares])),
    )


@torch.no_grad()
def build_plan(
    layers: list[LayerState], config: ResiDualConfig, arch: Architecture, device: torch.device, dtype: torch.dtype
) -> ReadoutPlan:
    """The :class:`ReadoutPlan` of a fitted adapter from every unit layer's state, in unit order, built in float64
    and stored in ``dtype`` on ``device``."""
    members, sum_weight, constant, num_scales = _members(layers, config, arch)

    def cast(tensor: torch.Tensor, to: torch.dtype | None = dtype) -> torch.Tensor:
        return tensor.to(device, to) if to is not None else tensor.to(device)

    padded_groups, indices = [], []
    for group in (g for g in members.values() if g):
        width = max(len(member.rows) for member in group)
        padded = torch.zeros(len(group), width, arch.output_dim, dtype=torch.float64)
        index = torch.full((len(group), width), num_scales)  # padding takes the zero appended to the scales
        for position, member in enumerate(group):
            padded[position, : len(member.rows)] = member.rows
            index[position, : len(member.rows)] = member.scales
        padded_groups.append((group, padded))
        indices.append(index.flatten())
    basis = cast(torch.cat([padded.flatten(0, 1) for _, padded in padded_groups] or [torch.zeros(0, arch.output_dim)]))
    lambda_index = torch.cat(indices or [torch.zeros(0, dtype=torch.long)])
    holds_component = lambda_index < num_scales
    groups, slot = [], 0
    for group, padded in padded_groups:
        units = cast(torch.tensor([member.unit for member in group]), None)
        means = cast(torch.stack([member.mean for member in group]))
        groups.append((units, means, basis[slot : slot + padded.shape[0] * padded.shape[1]].view(padded.shape)))
        slot += padded.shape[0] * padded.shape[1]
    heads = members["heads"]
    mlp_layers = [_layer_of(arch, member.unit) for member in members["mlps"]]
    shift = -holds_component.double() if config.remainder == "keep" else torch.zeros(len(lambda_index))
    return ReadoutPlan(
        groups=tuple(groups),
        basis=basis,
        lambda_index=cast(lambda_index, None),
        lambda_shift=cast(shift),
        components=cast(holds_component.nonzero().flatten(), None),
        sum_weight=cast(sum_weight),
        constant=cast(constant),
        head_scores=_head_scores(heads, padded_groups[0][1].shape[1], config, arch, cast) if heads else None,
        mlp_layers=cast(torch.tensor(mlp_layers, dtype=torch.long), None),
        raw_weights=_raw_weights(sum_weight, mlp_layers, arch, cast),
    )
