"""ResiDual tuner layers.

The residual stream itself is never changed: a :class:`ResiDualUnitLayer` wraps the module that produces a group of
units (one layer's heads, or one MLP) and holds their PCA bases, means and trainable scales, while the
:class:`ResiDualReadoutLayer` wraps the module producing the output (the projection, else the final norm) and replaces
that output by the sum of the transformed units. Because each transformed unit contributes
``sum_j lambda_j * s_j * phi_j`` with PCA scores ``s_j = phi_j . (u - mu)``, the adapted output is always

    ``offset + (scores * lambda) @ basis``

where ``scores`` and ``offset`` do not depend on ``lambda``. The cached training path stores exactly these two tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .decomposition import UnitTrace


class ResiDualTunerLayer(BaseTunerLayer):
    """Common base of the ResiDual layers: they wrap a module and pass its output through unchanged."""

    adapter_layer_names: tuple[str, ...] = ("residual_lambda",)
    other_param_names: tuple[str, ...] = ("residual_basis", "residual_mean", "residual_rank")

    def _init_tuner_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("ResiDual rescales output-space units and cannot be merged into weights.")

    def unmerge(self) -> None:
        raise NotImplementedError("ResiDual rescales output-space units and cannot be merged into weights.")


class ResiDualUnitLayer(nn.Module, ResiDualTunerLayer):
    """Holds the ResiDual state of a group of units produced by one module.

    Per adapter: ``residual_mean`` ``[units, dim]``; for transformed units also ``residual_rank`` ``[units]``
    (components per unit), ``residual_basis`` ``[sum(rank), dim]`` (rows grouped by unit) and the trainable
    ``residual_lambda`` ``[sum(rank)]`` (``[units]`` with one scale per unit). Untransformed units get a layer only when
    they are replaced by their mean.
    """

    def __init__(self, base_layer: nn.Module, unit_slice: slice, unit_names: list[str], kind: str, **kwargs) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.unit_slice = unit_slice
        self.unit_names = unit_names
        self.kind = kind
        self.residual_lambda = nn.ParameterDict({})
        self.residual_basis = BufferDict({}, persistent=True)
        self.residual_mean = BufferDict({}, persistent=True)
        self.residual_rank = BufferDict({}, persistent=True)
        self.residual_remainder: dict[str, str] = {}

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    def update_layer(self, adapter_name: str, transformed: bool, remainder: str, inference_mode: bool = False) -> None:
        """Create empty state for ``adapter_name``; :meth:`set_fit` or a checkpoint load fills it."""
        device = self._base_device()
        self.residual_mean[adapter_name] = torch.empty(0, device=device)
        if transformed:
            self.residual_rank[adapter_name] = torch.empty(0, dtype=torch.long, device=device)
            self.residual_basis[adapter_name] = torch.empty(0, device=device)
            self.residual_lambda[adapter_name] = nn.Parameter(torch.empty(0, device=device))
        self.residual_remainder[adapter_name] = remainder
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _base_device(self) -> torch.device:
        tensor = next(self.get_base_layer().parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def component_lambdas(self, adapter_name: str) -> torch.Tensor:
        """One scale per component, ``[sum(rank)]``, repeating per-unit scales over their unit's components."""
        lambdas = self.residual_lambda[adapter_name]
        rank = self.residual_rank[adapter_name]
        return lambdas.repeat_interleave(rank) if len(lambdas) != int(rank.sum()) else lambdas

    def is_transformed(self, adapter_name: str) -> bool:
        return adapter_name in self.residual_lambda

    def is_fitted(self, adapter_name: str) -> bool:
        return self.residual_mean[adapter_name].numel() > 0

    def set_fit(
        self, adapter_name: str, mean: torch.Tensor, bases: list[torch.Tensor] | None, lambdas: list[torch.Tensor]
    ) -> None:
        """Store a fitted mean ``[units, dim]`` and, when transformed, per-unit bases ``[k_u, dim]`` and scales."""
        device = self._base_device()
        self.residual_mean[adapter_name] = mean.float().to(device)
        if self.is_transformed(adapter_name):
            self.residual_rank[adapter_name] = torch.tensor([b.shape[0] for b in bases], device=device)
            self.residual_basis[adapter_name] = torch.cat(bases).float().to(device)
            with torch.no_grad():
                self.residual_lambda[adapter_name] = nn.Parameter(
                    torch.cat(lambdas).float().to(device),
                    requires_grad=self.residual_lambda[adapter_name].requires_grad,
                )

    def allocate(self, adapter_name: str, shapes: dict[str, torch.Size]) -> None:
        """Resize the empty state of ``adapter_name`` to a checkpoint's shapes, so that it can be loaded into."""
        device = self._base_device()
        for name, shape in shapes.items():
            container = getattr(self, name)
            if name == "residual_lambda":
                container[adapter_name] = nn.Parameter(
                    torch.zeros(shape, device=device), requires_grad=container[adapter_name].requires_grad
                )
            else:
                container[adapter_name] = torch.zeros(shape, dtype=container[adapter_name].dtype, device=device)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)

    def _padded_basis(self, adapter_name: str) -> torch.Tensor:
        """The flat basis as ``[units, max_rank, dim]``, with zero rows where a unit has fewer components."""
        rank = self.residual_rank[adapter_name]
        basis = self.residual_basis[adapter_name].float()
        owner = torch.repeat_interleave(torch.arange(self.num_units, device=rank.device), rank)
        position = torch.arange(basis.shape[0], device=rank.device) - (torch.cumsum(rank, 0) - rank)[owner]
        padded = basis.new_zeros(self.num_units, int(rank.max()), basis.shape[1])
        padded[owner, position] = basis
        return padded

    def scores_and_offset(self, adapter_name: str, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PCA scores ``[batch, sum(rank)]`` and the scale-independent part ``[batch, dim]`` of these units."""
        mean = self.residual_mean[adapter_name].float()
        if not self.is_transformed(adapter_name):
            return units.new_zeros(units.shape[0], 0), mean.sum(0).expand(units.shape[0], -1)
        centred = units - mean
        padded = self._padded_basis(adapter_name)
        padded_scores = torch.einsum("bnd,nkd->bnk", centred, padded)
        rank = self.residual_rank[adapter_name]
        valid = torch.arange(padded.shape[1], device=rank.device) < rank[:, None]
        scores = padded_scores[:, valid]
        if self.residual_remainder[adapter_name] == "keep":
            offset = centred.sum(1) - torch.einsum("bnk,nkd->bd", padded_scores, padded)
        else:
            offset = centred.new_zeros(centred.shape[0], centred.shape[2])
        return scores, offset


class ResiDualReadoutLayer(nn.Module, ResiDualTunerLayer):
    """Wraps the output module (projection, else final norm) and returns the sum of the transformed units.

    For a final norm applied to the whole sequence (DINOv2), only the CLS position is replaced; the other tokens of
    ``last_hidden_state`` are the base model's.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("residual_rest",)

    def __init__(self, base_layer: nn.Module, trace: UnitTrace, **kwargs) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.trace = trace
        self.unit_layers: list[ResiDualUnitLayer] = []
        self.residual_rest: dict[str, str] = {}
        # float32 whatever the base dtype; the trainer raises it to float64 while training (see trainer.py)
        self.compute_dtype = torch.float32

    def update_layer(self, adapter_name: str, rest: str, inference_mode: bool = False) -> None:
        self.residual_rest[adapter_name] = rest

    def _layers_of(self, adapter_name: str) -> list[ResiDualUnitLayer]:
        return [layer for layer in self.unit_layers if adapter_name in layer.residual_mean]

    def check_fitted(self, adapter_name: str) -> None:
        layers = self._layers_of(adapter_name)
        unfitted = [layer.unit_names[0] for layer in layers if not layer.is_fitted(adapter_name)]
        if unfitted:
            raise RuntimeError(
                f"ResiDual adapter '{adapter_name}' has no PCA bases yet (first unfitted unit: {unfitted[0]}). Call "
                "peft_residual.fit_residual_bases(model, dataloader) on reference images, or load a saved adapter."
            )

    def scores_and_offset(self, adapter_name: str, contributions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split unit contributions ``[batch, units, dim]`` into PCA scores and the part the scales do not touch."""
        self.check_fitted(adapter_name)
        covered = torch.zeros(contributions.shape[1], dtype=torch.bool, device=contributions.device)
        scores, offset = [], contributions.new_zeros(contributions.shape[0], contributions.shape[2])
        for layer in self._layers_of(adapter_name):
            layer_scores, layer_offset = layer.scores_and_offset(adapter_name, contributions[:, layer.unit_slice])
            scores.append(layer_scores)
            offset = offset + layer_offset
            covered[layer.unit_slice] = True
        if self.residual_rest[adapter_name] == "sum":
            offset = offset + contributions[:, ~covered].sum(1)
        return torch.cat(scores, dim=1), offset

    def lambdas(self, adapter_name: str) -> torch.Tensor:
        """All trainable scales of the adapter, in score order."""
        layers = [layer for layer in self._layers_of(adapter_name) if layer.is_transformed(adapter_name)]
        return torch.cat([layer.component_lambdas(adapter_name).to(self.compute_dtype) for layer in layers])

    def basis(self, adapter_name: str) -> torch.Tensor:
        """All PCA components of the adapter, ``[sum(rank), dim]``, in score order."""
        layers = [layer for layer in self._layers_of(adapter_name) if layer.is_transformed(adapter_name)]
        return torch.cat([layer.residual_basis[adapter_name].to(self.compute_dtype) for layer in layers])

    def adapt(self, adapter_name: str, contributions: torch.Tensor) -> torch.Tensor:
        """The ResiDual output for unit contributions ``[batch, units, dim]``."""
        scores, offset = self.scores_and_offset(adapter_name, contributions)
        dtype = self.compute_dtype
        return combine(scores.to(dtype), offset.to(dtype), self.lambdas(adapter_name), self.basis(adapter_name))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if len(self.active_adapters) != 1:
            raise ValueError(f"ResiDual runs one adapter at a time, but {self.active_adapters} are active.")
        adapted = self.adapt(self.active_adapters[0], self.trace.contributions())
        # the output keeps the base dtype, except while the trainer runs in float64 all the way to the loss
        adapted = adapted.to(result.dtype if self.compute_dtype == torch.float32 else self.compute_dtype)
        self.trace.clear()
        if result.dim() == 3:  # a final norm over the whole sequence: only the CLS token is ResiDual's
            return torch.cat([adapted.unsqueeze(1), result[:, 1:].to(adapted.dtype)], dim=1)
        return adapted


def combine(scores: torch.Tensor, offset: torch.Tensor, lambdas: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``offset + (scores * lambdas) @ basis``: the adapted output from its scale-independent parts."""
    return offset + (scores * lambdas) @ basis
