"""The trainable scales of one ResiDual adapter, held apart from the model while they train."""

from __future__ import annotations

import torch
from torch import nn

from ..tuner import residual_tuner
from ..tuner.errors import ResiDualInputError
from ..tuner.plan import readout

TRAINING_DTYPE = torch.float64
"""The scales, their optimiser state, the adapted output and every sum over samples are float64."""
READOUT_DTYPE = torch.float32
"""The products of the scores with the basis, nearly all of a step's arithmetic, run in float32 (the tiled form of
:func:`~.tuner.layer.readout`): about 1.7 times as fast as float64 on a CPU."""


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
        if readout.merged:
            raise ResiDualInputError(
                f"Adapter '{self.adapter}' is merged, so the model's output no longer follows its scales; call "
                "model.unmerge_adapter() before training them."
            )
        self.config = tuner.peft_config[self.adapter]
        self.layers = readout.transformed_layers(self.adapter)
        groups = [layer.residual_lambda[self.adapter].detach() for layer in self.layers]
        self.sizes = [len(group) for group in groups]
        """The number of scales of each layer, in :attr:`values`' order."""
        self.values = nn.Parameter(torch.cat(groups).to(device, dtype))
        plan = readout.plan(self.adapter)
        index = plan.lambda_index[plan.components]
        self._index = (
            None if torch.equal(index, torch.arange(len(self.values), device=index.device)) else index.to(device)
        )
        """Which scale each component takes, where some layers have one scale per unit or the order differs."""
        self.basis = readout.basis(self.adapter).to(device, READOUT_DTYPE)
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
        return readout(scores, self.lambdas(), self.basis, offset, tiled=True)

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
