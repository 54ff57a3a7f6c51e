"""The trainable scales of one ResiDual adapter, held apart from the model while they train."""

from __future__ import annotations

import torch
from torch import nn

from .tuner import residual_tuner
from .tuner.layer import combine, per_component

TRAINING_DTYPE = torch.float64
"""The scales train in float64: they are few, and exact sums make multi-process runs match single-process ones."""


class ScaleSet:
    """Float64 copies of an adapter's λ (one leaf per unit group) and its basis; :meth:`write_back` stores them.

    The adapted output of cached or streamed ``(scores, offset)`` is ``offset + (scores * λ) @ basis``, so training
    needs nothing else from the model.

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
        self.params = [
            nn.Parameter(layer.residual_lambda[self.adapter].detach().to(device, dtype)) for layer in self.layers
        ]
        self.ranks = [layer.residual_rank[self.adapter].to(device) for layer in self.layers]
        self.basis = readout.basis(self.adapter, dtype).to(device)
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
    def count(self) -> int:
        return sum(param.numel() for param in self.params)

    def lambdas(self) -> torch.Tensor:
        """One scale per component, in score order."""
        return torch.cat([per_component(param, rank) for param, rank in zip(self.params, self.ranks, strict=True)])

    def output(self, scores: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The adapted embedding of cached or streamed ``scores`` and ``offset``."""
        dtype = self.basis.dtype
        return combine(scores.to(dtype), offset.to(dtype), self.lambdas(), self.basis)

    def snapshot(self) -> list[torch.Tensor]:
        return [param.detach().clone() for param in self.params]

    @torch.no_grad()
    def load(self, values: list[torch.Tensor]) -> None:
        for param, value in zip(self.params, values, strict=True):
            param.copy_(value)

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the current scales in the model's adapter (in its dtype)."""
        for layer, param in zip(self.layers, self.params, strict=True):
            layer.residual_lambda[self.adapter].copy_(param)
