"""Unit decomposition: the pooled (or projected) CLS output as an exact sum of per-unit direct contributions.

For a pre-LN ViT the CLS residual entering the final norm is ``r = e + sum_l (sum_h a_lh + m_l)``: the embedding, every
attention head (its slice of the output projection applied to that head's output, plus ``bias / H``, times any layer
scale) and every MLP. Freezing the final LayerNorm's per-sample statistics ``mean(r)`` and ``std(r)`` makes it linear,
followed by the projection where the model has one. The norm's (and the projection's) bias is shared ``1 / (2L + 1)``
per residual block, an attention block's share split evenly among its heads. The norm's centring can be split two
ways (:data:`LN_MEANS`), both summing exactly to the model's output:

- ``"shared"`` (the paper's code): the residual's mean is shared like the bias, so a unit with share ``s`` gets
  ``gamma * (u - s * mean(r)) / std(r) + s * beta``;
- ``"unit"``: each unit is centred on its own mean, ``gamma * (u - mean(u)) / std(r) + s * beta``.

The CLS pieces come from a :class:`UnitRecord`, filled either by the ResiDual layers themselves during an adapted
forward, or by :func:`recording`, which hooks the base modules for the duration of one block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import Architecture

LN_MEANS = ("shared", "unit")
"""How the final norm's mean is split among the units (see the module docstring)."""


def cls_piece(kind: str, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """What a unit module of ``kind`` adds at the CLS token: the heads enter the output projection as its input."""
    source = inputs[0] if kind == "heads" else output
    return source[:, 0].detach().clone()  # a copy, so that the record does not keep the whole sequence alive


@dataclass
class UnitRecord:
    """The raw CLS pieces of one forward pass: the embedding, each layer's concatenated heads and each MLP output."""

    embedding: torch.Tensor | None = None
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    mlps: dict[int, torch.Tensor] = field(default_factory=dict)
    num_tokens: int | None = None
    """Sequence length of the embedding output, which tells the image size the model saw."""

    def capture(self, kind: str, layer: int | None, inputs: tuple, output: torch.Tensor) -> None:
        """Store what the unit module of ``kind`` (in ``layer``) produced in one forward call."""
        piece = cls_piece(kind, inputs, output)
        if kind == "embedding":
            self.embedding, self.num_tokens = piece, output.shape[1]
        else:
            (self.heads if kind == "heads" else self.mlps)[layer] = piece

    def clear(self) -> None:
        self.embedding, self.num_tokens = None, None
        self.heads.clear()
        self.mlps.clear()

    def raw_units(self, arch: Architecture) -> torch.Tensor:
        """The units as they enter the residual stream at CLS, ``[batch, units, hidden]`` in float32."""
        complete = range(arch.num_layers)
        if self.embedding is None or sorted(self.heads) != list(complete) or sorted(self.mlps) != list(complete):
            raise RuntimeError("No complete forward pass was recorded; run the model on pixel_values first.")
        batch = self.embedding.shape[0]
        units = [self.embedding.float().unsqueeze(1)]
        for layer in complete:
            out_proj = arch.module(arch.spec.attention_out, layer)
            weight = out_proj.weight.float().view(arch.hidden_size, arch.num_heads, arch.head_dim)
            head_inputs = self.heads[layer].float().view(batch, arch.num_heads, arch.head_dim)
            heads = torch.einsum("bhk,dhk->bhd", head_inputs, weight)
            if out_proj.bias is not None:
                heads = heads + out_proj.bias.float() / arch.num_heads
            scale = arch.attention_layer_scale(layer)
            if scale is not None:
                heads = heads * scale.float()
            units += [heads, self.mlps[layer].float().unsqueeze(1)]
        return torch.cat(units, dim=1)

    def contributions(self, arch: Architecture, ln_mean: str = "shared") -> torch.Tensor:
        """Direct contributions in output space, ``[batch, units, output_dim]`` in float32; they sum to the output."""
        return linearise(self.raw_units(arch), arch, ln_mean)


def unit_modules(arch: Architecture) -> Iterator[tuple[str, str, int | None]]:
    """``(path, kind, layer)`` of every module that produces units, in unit order."""
    yield arch.spec.embedding, "embedding", None
    for layer in range(arch.num_layers):
        yield arch.spec.attention_out.format(i=layer), "heads", layer
        yield arch.spec.mlp_out.format(i=layer), "mlps", layer


def bias_shares(arch: Architecture) -> torch.Tensor:
    """Each unit's share of a constant added after the residual stream: ``1/(2L+1)`` per block, split among heads."""
    blocks = 2 * arch.num_layers + 1
    shares = torch.full((arch.num_units,), 1.0 / blocks)
    for layer in range(arch.num_layers):
        shares[arch.heads_slice(layer)] = 1.0 / (blocks * arch.num_heads)
    return shares


def linearise(raw_units: torch.Tensor, arch: Architecture, ln_mean: str = "shared") -> torch.Tensor:
    """Push raw residual units through the final norm, frozen at each sample's statistics, and the projection;
    ``ln_mean`` says how the norm's mean is split among the units (:data:`LN_MEANS`)."""
    if ln_mean not in LN_MEANS:
        raise ValueError(f"ln_mean must be one of {LN_MEANS}, got {ln_mean!r}.")
    norm = arch.final_norm
    residual = raw_units.sum(dim=1)
    std = torch.sqrt(residual.var(dim=-1, unbiased=False) + norm.eps)
    shares = bias_shares(arch).to(raw_units)
    if ln_mean == "shared":
        centred = raw_units - shares[None, :, None] * residual.mean(dim=-1)[:, None, None]
    else:
        centred = raw_units - raw_units.mean(dim=-1, keepdim=True)
    out = centred / std[:, None, None]
    if norm.weight is not None:
        out = out * norm.weight.float()
    if norm.bias is not None:
        out = out + shares[:, None] * norm.bias.float()
    projection = arch.projection
    if projection is not None:
        out = out @ projection.weight.float().T
        if projection.bias is not None:
            out = out + shares[:, None] * projection.bias.float()
    return out


class _Recorder:
    """A forward hook storing one module's CLS piece into a record (a class, not a closure, so it never leaks)."""

    def __init__(self, record: UnitRecord, kind: str, layer: int | None) -> None:
        self.record, self.kind, self.layer = record, kind, layer

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.record.capture(self.kind, self.layer, inputs, output)


@contextmanager
def recording(model: nn.Module) -> Iterator[UnitRecord]:
    """Record the unit pieces of every forward pass in the block; the hooks are removed on exit.

    Works on a bare supported model and on one wrapped by PEFT (the hooks sit on the base modules).
    """
    arch = Architecture(model)
    record = UnitRecord()
    handles = [
        arch.module(path).register_forward_hook(_Recorder(record, kind, layer))
        for path, kind, layer in unit_modules(arch)
    ]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _first_token_only(module: nn.Module, args: tuple) -> tuple:
    return (args[0][:, :1], *args[1:])


@contextmanager
def last_block_at_cls(arch: Architecture) -> Iterator[None]:
    """Run the last block's attention output projection and MLP on the CLS token alone for the duration.

    Only CLS leaves the last block toward the pooled output, so the other tokens' projections and MLPs there are
    wasted work in a pass that only records units (a twelfth of a 12-layer model's MLP and projection work). The
    block's residual adds then broadcast CLS over the sequence: every token but CLS of its output is wrong, so the
    model's outputs must not be used in the block.
    """
    last = arch.num_layers - 1
    paths = (arch.spec.attention_out, arch.spec.mlp or arch.spec.mlp_out)
    handles = [arch.module(path, last).register_forward_pre_hook(_first_token_only) for path in paths]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def record_backbone(model: nn.Module, pixel_values: torch.Tensor) -> UnitRecord:
    """Run only the vision backbone of ``model`` (no ResiDual readout) and return what its unit modules produced."""
    arch = Architecture(model)
    with recording(model) as record, readout_bypassed(model), last_block_at_cls(arch):
        arch.tower(pixel_values=pixel_values)
    return record


@torch.no_grad()
def unit_contributions(model: nn.Module, pixel_values: torch.Tensor, ln_mean: str = "shared") -> torch.Tensor:
    """The direct contributions ``[batch, units, output_dim]`` of one batch, from one backbone pass."""
    return record_backbone(model, pixel_values).contributions(Architecture(model), ln_mean)


@contextmanager
def readout_bypassed(model: nn.Module) -> Iterator[None]:
    """Let any ResiDual readout layer of ``model`` pass its base output through for the block."""
    from .layer import ResiDualReadoutLayer

    readouts = [m for m in model.modules() if isinstance(m, ResiDualReadoutLayer) and not m.bypass]
    for readout in readouts:
        readout.bypass = True
    try:
        yield
    finally:
        for readout in readouts:
            readout.bypass = False


@dataclass
class Units:
    """Direct contributions ``[batch, units, output_dim]`` and the unit names along dimension 1."""

    contributions: torch.Tensor
    names: list[str]


def decompose_units(model: nn.Module, pixel_values: torch.Tensor, ln_mean: str = "shared") -> Units:
    """Decompose the model's pooled (or projected) CLS output into per-unit direct contributions.

    ``contributions.sum(1)`` equals the base model's ``pooler_output`` (``image_embeds`` with a projection) for
    either split of the norm's mean (``ln_mean``, see :data:`LN_MEANS`).

    Example:
        >>> units = decompose_units(CLIPVisionModelWithProjection(config), pixel_values)
        >>> torch.allclose(units.contributions.sum(1), model(pixel_values=pixel_values).image_embeds, atol=1e-5)
        True
    """
    return Units(unit_contributions(model, pixel_values, ln_mean), list(Architecture(model).unit_names))
