"""The readout formula, and each adapter's readout plan: how the training cache computes its scores.

The cache (and training) compute the adapted output as :func:`readout`, ``offset + (scores * lambda) @ basis``, from
the units' contributions in output space (:meth:`ReadoutPlan.scores`), in shapes fixed once per fit, load, move or
switch. A forward folds its pieces in instead (:mod:`.fold`); both take the transformed units from :func:`members`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..models import Architecture
from .config import ResiDualConfig


def readout(scores: torch.Tensor, lambdas: torch.Tensor, basis: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The adapted output ``offset + (scores * lambdas) @ basis`` of ``scores [batch, c]``, ``lambdas [c]`` and
    ``basis [c, dim]`` (training runs it tile by tile: ``peft_residual.training.scales.tiled_readout``).

    Example:
        >>> out = readout(scores, lambdas, basis, offset)  # [batch, dim]
    """
    return torch.addmm(offset, scores * lambdas, basis)


class OutputSpace(NamedTuple):
    """A unit layer's fitted state in output space, float64 on the CPU."""

    mean: torch.Tensor
    """``[units, output_dim]``."""
    basis: torch.Tensor
    """Every unit's orthonormal components, concatenated, ``[sum(rank), output_dim]``."""
    rank: list[int]
    """Components per unit (0 for a unit that is not transformed)."""

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


class ReadoutPlan(NamedTuple):
    """One adapter's training readout beyond the scales, in static shapes: the transformed units in groups of one
    kind (heads, then MLPs), each padded to its largest rank (zero rows taking a zero scale) for one batched product
    per group."""

    groups: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    """Per group: unit indices ``[n]``, means ``[n, dim]`` (zero when uncentred) and padded bases ``[n, k, dim]``
    (views into :attr:`basis`)."""
    basis: torch.Tensor
    """All padded components, ``[slots, dim]``."""
    lambda_shift: torch.Tensor
    """Per slot, added to its scale: ``-1`` for components whose unit keeps its remainder (``remainder="keep"``)."""
    components: torch.Tensor
    """The slots that hold a component, in score order (the training cache's scores)."""
    sum_weight: torch.Tensor
    """Per unit, 1 where its contribution is added unchanged."""
    constant: torch.Tensor
    """``[dim]``: the means that replace units, minus those of units that keep their remainder."""
    score_order: Components
    """The components in score order, without padding, and which scale each takes."""
    shares: torch.Tensor
    """``[units]``: each unit's bias share (``Architecture.bias_shares``) where the plan lives, for
    :func:`~.decomposition.linearise`."""

    def scores(self, contributions: torch.Tensor) -> torch.Tensor:
        """Padded PCA scores ``[batch, slots]`` of unit contributions ``[batch, units, dim]``."""
        scores = [
            _group_scores(contributions.index_select(1, units), mean, basis) for units, mean, basis in self.groups
        ]
        return torch.cat(scores or [contributions.new_zeros(len(contributions), 0)], dim=1)

    def offset(self, contributions: torch.Tensor) -> torch.Tensor:
        """The part of the output no scale touches, before any kept remainder."""
        return torch.einsum("bnd,n->bd", contributions, self.sum_weight) + self.constant


class Components(NamedTuple):
    """An adapter's components in score order (the training cache's scores) and which of its scales each takes."""

    basis: torch.Tensor
    """``[components, output_dim]``."""
    scale_index: torch.Tensor | None
    """Per component, its scale's index among the adapter's concatenated scales (``None``: one scale per component,
    in order)."""

    def scales(self, scales: torch.Tensor) -> torch.Tensor:
        """One scale per component from the adapter's concatenated ``scales`` (a forward's follow ``Fold.index``)."""
        return scales if self.scale_index is None else scales[self.scale_index]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Components:
        index = None if self.scale_index is None else self.scale_index.to(device)
        return Components(self.basis.to(device, dtype), index)


def _group_scores(contributions: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``[batch, n * k]``: one ``[batch, dim] @ [dim, k]`` product per unit of a group, batched."""
    return torch.bmm((contributions - mean).transpose(0, 1), basis.transpose(1, 2)).transpose(0, 1).flatten(1)


class Member(NamedTuple):
    """A transformed unit."""

    unit: int
    """Its index among all units."""
    mean: torch.Tensor
    """``[dim]``: the mean it is centred on (zero when uncentred)."""
    rows: torch.Tensor
    """``[rank, dim]``: its components."""
    scales: torch.Tensor
    """``[rank]``: which of the adapter's concatenated scales each component takes."""


def members(
    layers: list[LayerState], config: ResiDualConfig, arch: Architecture
) -> tuple[dict[str, list[Member]], torch.Tensor, torch.Tensor, int]:
    """The transformed units by kind, per unit its weight in the sum (``sum_weight``: 1 for a unit added
    unchanged or keeping its remainder), the ``constant`` (means replacing units, less those of units keeping their
    remainder) and the number of scales, all float64 (the one reading of the treatments for both readouts)."""
    sum_weight = torch.zeros(arch.num_units, dtype=torch.float64)
    constant = torch.zeros(arch.output_dim, dtype=torch.float64)
    transformed: dict[str, list[Member]] = {"heads": [], "mlps": []}
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
            transformed[layer.kind].append(Member(index, mean, rows, scales))
            if config.remainder == "keep":
                sum_weight[index] = 1.0
                constant -= mean
    return transformed, sum_weight, constant, num_scales


@torch.no_grad()
def build_plan(
    layers: list[LayerState], config: ResiDualConfig, arch: Architecture, device: torch.device, dtype: torch.dtype
) -> ReadoutPlan:
    """The :class:`ReadoutPlan` of a fitted adapter from every unit layer's state, in unit order, built in float64
    and stored in ``dtype`` on ``device``."""
    transformed, sum_weight, constant, num_scales = members(layers, config, arch)

    def cast(tensor: torch.Tensor, to: torch.dtype | None = dtype) -> torch.Tensor:
        return tensor.to(device, to) if to is not None else tensor.to(device)

    padded_groups, indices = [], []
    for group in (g for g in transformed.values() if g):
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
    shift = -holds_component.double() if config.remainder == "keep" else torch.zeros(len(lambda_index))
    components = holds_component.nonzero().flatten()
    index = lambda_index[components]
    identity = torch.equal(index, torch.arange(len(index)))
    return ReadoutPlan(
        groups=tuple(groups),
        basis=basis,
        lambda_shift=cast(shift),
        components=cast(components, None),
        score_order=Components(basis[components.to(basis.device)], None if identity else cast(index, None)),
        sum_weight=cast(sum_weight),
        constant=cast(constant),
        shares=cast(arch.bias_shares),
    )
