"""The trainable scales of one ResiDual adapter, held apart from the model while they train."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tuner import residual_tuner
from .tuner.layer import per_component

TRAINING_DTYPE = torch.float64
"""The scales, their optimiser state, the adapted output and every sum over samples are float64."""
READOUT_DTYPE = torch.float32
"""The products of the scores with the basis, nearly all of a step's arithmetic, run in float32: about 1.7 times as
fast as float64 on a CPU."""
TILE = 32
"""Samples per readout product. A float32 product's rounding depends on its shape, so every product is one tile of
exactly this many samples (zero-padded), and processes share a cached batch by whole tiles (:mod:`.steps`):
each sample's arithmetic is then the same for any number of processes, and only the float64 sums over tiles are
associated differently. Smaller tiles would spread a batch of 64 over more processes, but they stream the basis
once per tile: at 16 the products already lose half their speed on a CPU."""


def _tiled(rows: torch.Tensor) -> torch.Tensor:
    """``[n, c]`` as ``[ceil(n / TILE), TILE, c]``, the last tile padded with zeros."""
    if len(rows) % TILE:
        rows = F.pad(rows, (0, 0, 0, TILE - len(rows) % TILE))
    return rows.view(-1, TILE, rows.shape[-1])


class _Readout(torch.autograd.Function):
    """``offset + (scores * lambdas) @ basis`` in ``lambdas``' dtype, the products tile by tile in ``basis``' dtype."""

    @staticmethod
    def forward(ctx, scores, offset, lambdas, basis):
        tiles = _tiled(scores.to(basis.dtype))
        products = torch.bmm(tiles * lambdas.to(basis.dtype), basis.expand(len(tiles), *basis.shape))
        ctx.save_for_backward(tiles, basis)
        return offset.to(lambdas.dtype) + products.flatten(0, 1)[: len(scores)].to(lambdas.dtype)

    @staticmethod
    def backward(ctx, grad):
        tiles, basis = ctx.saved_tensors
        projected = torch.bmm(basis.expand(len(tiles), *basis.shape), _tiled(grad.to(basis.dtype)).transpose(1, 2))
        per_tile = torch.sum(projected * tiles.transpose(1, 2), 2, dtype=grad.dtype)
        return None, None, per_tile.sum(0), None


class ScaleSet:
    """Float64 copies of an adapter's λ, every unit group's in one leaf, and its float32 basis; :meth:`write_back`
    stores the scales.

    The adapted output of cached or streamed ``(scores, offset)`` is ``offset + (scores * λ) @ basis``, so training
    needs nothing else from the model. One leaf, not one per layer, so that the optimiser updates one tensor a step.

    Example:
        >>> scales = ScaleSet(peft_model)
        >>> logits = classifier(scales.output(scores, offset))
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype = TRAINING_DTYPE):
        tuner = residual_tuner(model)
        self.adapter = tuner.active_adapters[0]
        readout = tuner.readout
        readout.check_fitted(self.adapter)
        self.config = tuner.peft_config[self.adapter]
        self.layers = readout.transformed_layers(self.adapter)
        groups = [layer.residual_lambda[self.adapter].detach() for layer in self.layers]
        self.sizes = [len(group) for group in groups]
        """The number of scales of each layer, in :attr:`values`' order."""
        self.values = nn.Parameter(torch.cat(groups).to(device, dtype))
        ranks = [layer.residual_rank[self.adapter] for layer in self.layers]
        scale_ids = torch.arange(sum(self.sizes)).split(self.sizes)
        index = torch.cat([per_component(ids, rank) for ids, rank in zip(scale_ids, ranks, strict=True)])
        self._index = None if len(index) == len(self.values) else index.to(device)
        """Which scale each component takes, where some layers have one scale per unit."""
        self.basis = readout.basis(self.adapter, READOUT_DTYPE).to(device)
        self.fitted_state = [
            tensor
            for layer in readout.layers_of(self.adapter)
            for tensor in (
                layer.residual_mean[self.adapter],
                *([layer.residual_basis[self.adapter]] if layer.is_transformed(self.adapter) else []),
            )
        ]
        """The mean and basis tensors the scales act on (for run fingerprints)."""

    @property
    def params(self) -> list[nn.Parameter]:
        """The leaves to optimise."""
        return [self.values]

    @property
    def count(self) -> int:
        return self.values.numel()

    def lambdas(self) -> torch.Tensor:
        """One scale per component, in score order."""
        return self.values if self._index is None else self.values[self._index]

    def output(self, scores: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The adapted embedding of cached or streamed ``scores`` and ``offset``."""
        return _Readout.apply(scores, offset, self.lambdas(), self.basis)

    def per_layer(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``values`` shaped like :attr:`values` (the scales, or optimiser state), split into one tensor per layer."""
        return [part.clone() for part in values.detach().split(self.sizes)]

    def snapshot(self) -> torch.Tensor:
        return self.values.detach().clone()

    @torch.no_grad()
    def load(self, values: torch.Tensor) -> None:
        self.values.copy_(values)

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the current scales in the model's adapter (in its dtype)."""
        for layer, part in zip(self.layers, self.values.split(self.sizes), strict=True):
            layer.residual_lambda[self.adapter].copy_(part)
