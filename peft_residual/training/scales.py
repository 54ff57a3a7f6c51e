"""The trainable scales of one ResiDual adapter, held apart from the model while they train."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ResiDualInputError
from ..tuner import active_adapter, residual_tuner

TRAINING_DTYPE = torch.float64
"""The scales, their optimiser state, the adapted output and every sum over samples are float64."""
READOUT_DTYPE = torch.float32
"""The products of the scores with the basis, nearly all of a step's arithmetic, run in float32
(:func:`tiled_readout`): about 1.7 times as fast as float64 on a CPU."""
TILE = 32
"""Samples per product in :func:`tiled_readout`. A float32 product's rounding depends on its shape, so every product
is one tile of exactly this many samples (zero-padded), and processes share a cached batch by whole tiles: each
sample's arithmetic is then the same for any number of processes. Smaller tiles would spread a batch of 64 over more
processes, but they stream the basis once per tile: at 16 the products already lose half their speed on a CPU."""


def _tiled(rows: torch.Tensor) -> torch.Tensor:
    """``[n, c]`` as ``[ceil(n / TILE), TILE, c]``, the last tile padded with zeros."""
    if len(rows) % TILE:
        rows = F.pad(rows, (0, 0, 0, TILE - len(rows) % TILE))
    return rows.view(-1, TILE, rows.shape[-1])


class _TiledReadout(torch.autograd.Function):
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


def tiled_readout(
    scores: torch.Tensor, lambdas: torch.Tensor, basis: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The training form of :func:`~peft_residual.tuner.plan.readout`, ``offset + (scores * lambdas) @ basis``: the
    result and the gradient (which reaches ``lambdas`` only) are in ``lambdas``' dtype (float64 in training), the
    products run in ``basis``' dtype (float32) one :data:`TILE` of samples at a time, so that a sample's bits do not
    depend on how a batch is split among processes.

    Example:
        >>> out = tiled_readout(scores, scales.lambdas(), scales.basis, offset)  # [batch, dim], float64
    """
    return _TiledReadout.apply(scores, lambdas, basis, offset)


class ScaleSet:
    """Float64 copies of an adapter's λ, every unit group's in one leaf, and its float32 basis; :meth:`write_back`
    stores the scales.

    The adapted output of cached or streamed ``(scores, offset)`` is ``offset + (scores * λ) @ basis``, so training
    needs nothing else from the model. One leaf, not one per layer, so that the optimiser updates one tensor a step.
    The adapter's tensors are read and written through its readout layer (``scales``, ``set_scales``,
    ``components``, ``fitted_state``).

    Example:
        >>> scales = ScaleSet(peft_model)
        >>> logits = classifier(scales.output(scores, offset))
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype = TRAINING_DTYPE):
        tuner = residual_tuner(model)
        self.adapter, self.readout = active_adapter(tuner), tuner.readout
        self.components = self.readout.components(self.adapter).to(device, READOUT_DTYPE)
        """The components in score order, and which scale each takes."""
        if self.readout.merged:
            raise ResiDualInputError(
                f"Adapter '{self.adapter}' is merged, so the model's output no longer follows its scales; call "
                "model.unmerge_adapter() before training them."
            )
        self.config = tuner.peft_config[self.adapter]
        groups = [scale.detach() for scale in self.readout.scales(self.adapter)]
        self.sizes = [len(group) for group in groups]
        """The number of scales of each layer, in :attr:`values`' order."""
        self.values = nn.Parameter(torch.cat(groups).to(device, dtype))
        self.fitted_state = self.readout.fitted_state(self.adapter)
        """The mean and basis tensors the scales act on (for run fingerprints)."""

    @property
    def basis(self) -> torch.Tensor:
        """``[components, output_dim]``, float32."""
        return self.components.basis

    @property
    def params(self) -> list[nn.Parameter]:
        """The leaves to optimise."""
        return [self.values]

    @property
    def count(self) -> int:
        return self.values.numel()

    def lambdas(self) -> torch.Tensor:
        """One scale per component, in score order."""
        return self.components.scales(self.values)

    def output(self, scores: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The adapted embedding of cached or streamed ``scores`` and ``offset``, on the scales' device (a cache
        encoded where the model is, e.g. the CPU, trains on the accelerator's device)."""
        device = self.basis.device
        return tiled_readout(scores.to(device), self.lambdas(), self.basis, offset.to(device))

    def per_layer(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``values`` shaped like :attr:`values` (the scales, or optimiser state), split into one tensor per layer."""
        return [part.clone() for part in values.detach().split(self.sizes)]

    def snapshot(self) -> torch.Tensor:
        return self.values.detach().clone()

    @torch.no_grad()
    def load(self, values: torch.Tensor) -> None:
        self.values.copy_(values)

    def write_back(self) -> None:
        """Store the current scales in the model's adapter (in its dtype)."""
        self.readout.set_scales(self.adapter, self.values)
