"""ResiDual tuner layers.

The residual stream itself is never changed. A :class:`ResiDualUnitLayer` wraps each module that produces units (the
embedding, one layer's attention output projection, one MLP): it passes the module's output through, records the
module's CLS piece into the readout's :class:`~.decomposition.UnitRecord`, and holds the PCA bases, means and
trainable scales of those units per adapter. The :class:`ResiDualReadoutLayer` wraps the module producing the output
(the projection, else the final norm) and replaces that output by the sum of the transformed units. Because each
transformed unit contributes ``sum_j lambda_j * s_j * phi_j`` with PCA scores ``s_j = phi_j . (u - mu)``, the adapted
output is always

    ``offset + (scores * lambda) @ basis``

where ``scores`` and ``offset`` do not depend on ``lambda``. The cached training path stores exactly these two tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .architectures import Architecture
from .decomposition import UnitRecord
from .errors import ResiDualInputError
from .head_space import head_frames
from .packing import pack_orthonormal, packed_size, unpack_orthonormal

ROLES = ("transform", "mean", "record")
"""Per adapter, a unit layer transforms its units, replaces them by their mean, or only records them."""


def _getattr_or_base(self: nn.Module, name: str) -> Any:
    # The base model may read attributes of a module it owns (ViTModel reads embeddings.patch_embeddings), so what
    # a wrapper lacks is looked up on the wrapped module.
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        if name == "base_layer":
            raise
        return getattr(self.base_layer, name)


class ResiDualLayer(BaseTunerLayer):
    """Common base of the ResiDual layers: they wrap a module and pass its output through."""

    adapter_layer_names: tuple[str, ...] = ("residual_lambda",)
    other_param_names: tuple[str, ...] = (
        "residual_basis",
        "residual_mean",
        "residual_rank",
        "residual_settings",
        "residual_output_space",  # a cache, but per adapter: delete_adapter must drop it too
    )

    def _init_tuner_layer(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "ResiDual rescales output-space units read out at the CLS token and cannot be merged into weights; "
            "keep the PeftModel, or use unload() to get the base model back."
        )

    def unmerge(self) -> None:
        warnings.warn("Already unmerged: ResiDual adapters are never merged. Nothing to do.", stacklevel=2)

    def _base_device(self) -> torch.device:
        tensor = next(self.get_base_layer().parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")


@dataclass(frozen=True)
class UnitSettings:
    """What one adapter does with the units of one unit layer (from its :class:`~.config.ResiDualConfig`)."""

    role: str = "record"
    """See :data:`ROLES`."""
    remainder: str = "drop"
    rest: str = "sum"
    """The config's ``rest``: what the units of a transformed layer that are not selected become."""
    ln_mean: str = "shared"
    centre: bool = True
    selected: tuple[bool, ...] | None = None
    """For a transformed layer, which of its units are transformed (``None``: all); the others have rank 0."""


class ResiDualUnitLayer(nn.Module, ResiDualLayer):
    """Records and holds the ResiDual state of the units produced by one module.

    Per adapter: ``residual_settings`` (a :class:`UnitSettings`); ``residual_mean`` ``[units, dim]`` unless the
    role is "record"; for transformed units also ``residual_rank`` ``[units]`` (components per unit, 0 for a unit
    that is not selected), ``residual_basis`` (each unit's ``[rank, dim]`` orthonormal rows as Householder
    reflectors, see :mod:`.packing`, concatenated) and the trainable ``residual_lambda`` ``[sum(rank)]`` (one per
    selected unit with one scale per unit). ``dim`` is the output dimension, except for heads, whose means and bases
    are stored in head coordinates (see :mod:`.head_space`). Output-space bases are rebuilt from the stored state
    once per adapter.
    """

    __getattr__ = _getattr_or_base

    def __init__(
        self,
        base_layer: nn.Module,
        kind: str,
        layer: int | None,
        unit_slice: slice,
        unit_names: list[str],
        arch: Architecture,
        **kwargs,
    ) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.kind = kind
        self.layer = layer
        self.unit_slice = unit_slice
        self.unit_names = unit_names
        self.arch = arch
        self.record: UnitRecord | None = None  # the readout's record, linked after injection
        self.residual_output_space: dict[str, tuple[torch.Tensor, ...]] = {}  # per adapter, rebuilt from the state
        self.residual_lambda = nn.ParameterDict({})
        self.residual_basis = BufferDict({}, persistent=True)
        self.residual_mean = BufferDict({}, persistent=True)
        self.residual_rank = BufferDict({}, persistent=True)
        self.residual_settings: dict[str, UnitSettings] = {}

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    def update_layer(self, adapter_name: str, settings: UnitSettings, inference_mode: bool = False) -> None:
        """Create empty state for ``adapter_name``; :meth:`set_fit` or a checkpoint load fills it."""
        device = self._base_device()
        self.residual_settings[adapter_name] = settings
        if settings.role != "record":
            self.residual_mean[adapter_name] = torch.empty(0, device=device)
        if settings.role == "transform":
            self.residual_rank[adapter_name] = torch.empty(0, dtype=torch.long, device=device)
            self.residual_basis[adapter_name] = torch.empty(0, device=device)
            self.residual_lambda[adapter_name] = nn.Parameter(torch.empty(0, device=device))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def settings(self, adapter_name: str) -> UnitSettings:
        return self.residual_settings.get(adapter_name, UnitSettings())

    def holds(self, adapter_name: str) -> bool:
        """Whether these units take part in ``adapter_name`` (transformed or mean-replaced)."""
        return self.settings(adapter_name).role != "record"

    def is_transformed(self, adapter_name: str) -> bool:
        return self.settings(adapter_name).role == "transform"

    def selected(self, adapter_name: str) -> list[bool]:
        """Per unit, whether ``adapter_name`` transforms it."""
        chosen = self.settings(adapter_name).selected
        return [self.is_transformed(adapter_name)] * self.num_units if chosen is None else list(chosen)

    def covers(self, adapter_name: str) -> torch.Tensor:
        """Per unit, whether this layer accounts for it in the adapted output (the readout adds the others)."""
        if self.settings(adapter_name).role == "mean":
            return torch.ones(self.num_units, dtype=torch.bool, device=self._base_device())
        return self.output_space(adapter_name)[4]

    def is_fitted(self, adapter_name: str) -> bool:
        return self.residual_mean[adapter_name].numel() > 0

    def component_lambdas(self, adapter_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One scale per component, ``[sum(rank)]``, repeating per-unit scales over their unit's components."""
        return per_component(self.residual_lambda[adapter_name].to(dtype), self.residual_rank[adapter_name])

    @property
    def in_head_space(self) -> bool:
        return self.kind == "heads"

    def max_rank(self, adapter_name: str) -> int:
        """The most components a unit of this layer can have under the adapter's convention."""
        settings = self.settings(adapter_name)
        return self.arch.max_rank(self.kind, settings.ln_mean, settings.centre)

    def stored_dim(self, adapter_name: str) -> int:
        """The width of this layer's stored means and bases for ``adapter_name``."""
        return self.max_rank(adapter_name) if self.in_head_space else self.arch.output_dim

    def frames(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Head coordinates ``(Q, t)`` (see :mod:`.head_space`) for a layer of heads, else ``None``."""
        if not self.in_head_space:
            return None
        settings = self.settings(adapter_name)
        return head_frames(self.arch, self.layer, settings.ln_mean, settings.centre)

    def set_fit(
        self,
        adapter_name: str,
        mean: torch.Tensor,
        bases: list[torch.Tensor] | None,
        lambdas: list[torch.Tensor],
        basis_dtype: torch.dtype = torch.float32,
        frames: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Store a fitted mean ``[units, dim]`` and, when transformed, per-unit bases ``[k_u, dim]`` and scales, and
        build the output-space bases (with ``frames``, the head coordinates the fit used, if given)."""
        device = self._base_device()
        self.residual_mean[adapter_name] = mean.float().to(device)
        if self.is_transformed(adapter_name):
            self.residual_rank[adapter_name] = torch.tensor([b.shape[0] for b in bases], device=device)
            self.residual_basis[adapter_name] = torch.cat([pack_orthonormal(rows) for rows in bases]).to(
                device, basis_dtype
            )
            with torch.no_grad():
                self.residual_lambda[adapter_name] = nn.Parameter(
                    torch.cat(lambdas).float().to(device),
                    requires_grad=self.residual_lambda[adapter_name].requires_grad,
                )
        self.residual_output_space[adapter_name] = self._rebuild(adapter_name, frames)

    def allocate(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Resize the empty state of ``adapter_name`` to a checkpoint's shapes and dtypes, to load it into."""
        device = self._base_device()
        self.residual_output_space.pop(adapter_name, None)
        for name, tensor in tensors.items():
            container = getattr(self, name)
            if name == "residual_lambda":
                container[adapter_name] = nn.Parameter(
                    torch.zeros(tensor.shape, device=device), requires_grad=container[adapter_name].requires_grad
                )
            else:
                container[adapter_name] = torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.residual_output_space.clear()  # new stored state: rebuild the output-space bases on next use
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self.residual_output_space.clear()  # moved or cast: rebuild on next use
        return super()._apply(fn, recurse)

    def output_space(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """``(mean [units, out], basis [sum(rank), out], padded basis [units, max_rank, out], valid [units,
        max_rank], selected [units])`` on the base device (float32, masks bool), rebuilt once per adapter from the
        stored state (unpacked in float64); ``valid`` marks the padded rows that hold a component, ``selected`` the
        units that are transformed."""
        if adapter_name not in self.residual_output_space:
            self.residual_output_space[adapter_name] = self._rebuild(adapter_name)
        return self.residual_output_space[adapter_name]

    @torch.no_grad()
    def _rebuild(
        self, adapter_name: str, frames: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, ...]:
        device = self._base_device()
        mean = self.residual_mean[adapter_name].double().cpu()
        frames = frames if frames is not None else self.frames(adapter_name)
        if frames is not None:
            mean = torch.einsum("nor,nr->no", frames[0], mean) + frames[1]
        selected = torch.tensor(self.selected(adapter_name), dtype=torch.bool, device=device)
        if not self.is_transformed(adapter_name):
            empty = mean.new_zeros(0, mean.shape[1]).float().to(device)
            no_rows = torch.zeros(0, 0, dtype=torch.bool, device=device)
            return mean.float().to(device), empty, empty[None], no_rows, selected
        rank = self.residual_rank[adapter_name].cpu().tolist()
        dim = self.stored_dim(adapter_name)
        rows = []
        packed = self.residual_basis[adapter_name].cpu().split([packed_size(k, dim) for k in rank])
        for unit, (unit_rank, unit_packed) in enumerate(zip(rank, packed, strict=True)):
            coefficients = unpack_orthonormal(unit_packed, unit_rank, dim)
            rows.append(coefficients @ frames[0][unit].T if frames is not None else coefficients)
        padded = mean.new_zeros(self.num_units, max(rank), mean.shape[1])
        for unit, unit_rows in enumerate(rows):
            padded[unit, : len(unit_rows)] = unit_rows
        valid = torch.arange(max(rank))[None, :] < torch.tensor(rank)[:, None]
        basis = torch.cat(rows).float().to(device)
        return mean.float().to(device), basis, padded.float().to(device), valid.to(device), selected

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        if self.record is not None:
            self.record.capture(self.kind, self.layer, args, output)
        return output

    def _transform_parts(
        self, adapter_name: str, units: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(padded scores [batch, units, max_rank], padded basis, valid, offset [batch, out])`` of a transformed
        layer: the offset holds any kept remainder and the means of mean-ablated unselected units."""
        mean, _, padded, valid, selected = self.output_space(adapter_name)
        settings = self.settings(adapter_name)
        centred = units - mean if settings.centre else units
        padded_scores = torch.einsum("bnd,nkd->bnk", centred, padded)
        offset = centred.new_zeros(centred.shape[0], centred.shape[2])
        if settings.remainder == "keep":
            offset = offset + centred[:, selected].sum(1) - torch.einsum("bnk,nkd->bd", padded_scores, padded)
        if settings.rest == "mean":
            offset = offset + mean[~selected].sum(0)
        return padded_scores, padded, valid, offset

    def scores_and_offset(self, adapter_name: str, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PCA scores ``[batch, sum(rank)]`` and the scale-independent part ``[batch, dim]`` of these units."""
        if not self.is_transformed(adapter_name):
            mean = self.output_space(adapter_name)[0]
            return units.new_zeros(units.shape[0], 0), mean.sum(0).expand(units.shape[0], -1)
        padded_scores, _, valid, offset = self._transform_parts(adapter_name, units)
        return padded_scores[:, valid], offset

    def adapted(self, adapter_name: str, units: torch.Tensor) -> torch.Tensor:
        """What these units add to the adapted output, ``[batch, out]``: ``offset + (scores * lambda) @ basis``
        computed per unit on the padded basis, without gathering scores."""
        if not self.is_transformed(adapter_name):
            return self.output_space(adapter_name)[0].sum(0).expand(units.shape[0], -1)
        padded_scores, padded, valid, offset = self._transform_parts(adapter_name, units)
        lambdas = padded_scores.new_zeros(valid.shape)
        lambdas[valid] = self.component_lambdas(adapter_name)
        return offset + torch.einsum("bnk,nkd->bd", padded_scores * lambdas, padded)


class ResiDualReadoutLayer(nn.Module, ResiDualLayer):
    """Wraps the output module (projection, else final norm) and returns the sum of the transformed units.

    For a final norm applied to the whole sequence (DINOv2), only the CLS position is replaced; the other tokens of
    ``last_hidden_state`` are the base model's. ``bypass`` (set by :func:`~.decomposition.readout_bypassed`) passes
    the base output through without touching which parameters train.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("residual_rest", "residual_tokens", "residual_ln_mean")

    __getattr__ = _getattr_or_base

    def __init__(self, base_layer: nn.Module, arch: Architecture, **kwargs) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer)
        self.arch = arch
        self.record = UnitRecord()
        self.unit_layers: list[ResiDualUnitLayer] = []
        self.bypass = False
        self.residual_rest: dict[str, str] = {}
        self.residual_tokens: dict[str, int | None] = {}
        """Per adapter, the token count the bases were fitted at (None before fitting), to flag other image sizes."""
        self.residual_ln_mean: dict[str, str] = {}

    def update_layer(
        self,
        adapter_name: str,
        rest: str,
        num_tokens: int | None,
        ln_mean: str = "shared",
        inference_mode: bool = False,
    ) -> None:
        self.residual_rest[adapter_name] = rest
        self.residual_tokens[adapter_name] = num_tokens
        self.residual_ln_mean[adapter_name] = ln_mean
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def link(self, unit_layers: list[ResiDualUnitLayer]) -> None:
        """Read the units of ``unit_layers`` (in unit order), which record into this layer's record."""
        self.unit_layers = sorted(unit_layers, key=lambda layer: layer.unit_slice.start)
        for layer in self.unit_layers:
            layer.record = self.record

    def layers_of(self, adapter_name: str) -> list[ResiDualUnitLayer]:
        """The unit layers taking part in ``adapter_name``, in unit order."""
        return [layer for layer in self.unit_layers if layer.holds(adapter_name)]

    def transformed_layers(self, adapter_name: str) -> list[ResiDualUnitLayer]:
        return [layer for layer in self.unit_layers if layer.is_transformed(adapter_name)]

    def check_fitted(self, adapter_name: str) -> None:
        unfitted = [layer.unit_names[0] for layer in self.layers_of(adapter_name) if not layer.is_fitted(adapter_name)]
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
        for layer in self.layers_of(adapter_name):
            layer_scores, layer_offset = layer.scores_and_offset(adapter_name, contributions[:, layer.unit_slice])
            scores.append(layer_scores)
            offset = offset + layer_offset
            covered[layer.unit_slice] = layer.covers(adapter_name).to(covered.device)
        if self.residual_rest[adapter_name] == "sum":
            offset = offset + contributions[:, ~covered].sum(1)
        return torch.cat(scores, dim=1), offset

    def lambdas(self, adapter_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All trainable scales of the adapter, one per component, in score order."""
        return torch.cat(
            [layer.component_lambdas(adapter_name, dtype) for layer in self.transformed_layers(adapter_name)]
        )

    def basis(self, adapter_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All PCA components of the adapter in output space, ``[sum(rank), output_dim]``, in score order."""
        layers = self.transformed_layers(adapter_name)
        return torch.cat([layer.output_space(adapter_name)[1].to(dtype) for layer in layers])

    def adapt(self, adapter_name: str, contributions: torch.Tensor) -> torch.Tensor:
        """The ResiDual output (float32) for unit contributions ``[batch, units, dim]``; the same sum as
        ``combine(*scores_and_offset(...), lambdas, basis)``, layer by layer."""
        self.check_fitted(adapter_name)
        covered = torch.zeros(contributions.shape[1], dtype=torch.bool, device=contributions.device)
        out = contributions.new_zeros(contributions.shape[0], contributions.shape[2])
        for layer in self.layers_of(adapter_name):
            out = out + layer.adapted(adapter_name, contributions[:, layer.unit_slice])
            covered[layer.unit_slice] = layer.covers(adapter_name).to(covered.device)
        if self.residual_rest[adapter_name] == "sum":
            out = out + contributions[:, ~covered].sum(1)
        return out

    def _check_image_size(self, adapter_name: str, num_tokens: int | None) -> None:
        fitted = self.residual_tokens.get(adapter_name)
        if fitted is None or num_tokens is None or num_tokens == fitted:
            return
        warnings.warn(  # Python shows each distinct message once per call site
            f"ResiDual adapter '{adapter_name}' was fitted on images of {fitted} tokens, but this input gives "
            f"{num_tokens}: the PCA bases do not describe units at another image size, so the output is unreliable. "
            "Resize the images to the size in adapter_config.json (base_signature.image_size).",
            stacklevel=2,
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.bypass or self.disable_adapters or not self.active_adapters:
            return result
        if len(self.active_adapters) != 1:
            raise ResiDualInputError(f"ResiDual runs one adapter at a time, but {self.active_adapters} are active.")
        adapter_name = self.active_adapters[0]
        self._check_image_size(adapter_name, self.record.num_tokens)
        contributions = self.record.contributions(self.arch, self.residual_ln_mean[adapter_name])
        adapted = self.adapt(adapter_name, contributions).to(result.dtype)
        self.record.clear()
        if result.dim() == 3:  # a final norm over the whole sequence: only the CLS token is ResiDual's
            return torch.cat([adapted.unsqueeze(1), result[:, 1:]], dim=1)
        return adapted


def per_component(lambdas: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Scales ``[sum(rank)]``: as they are if there is one per component, else one per transformed unit (rank > 0)
    repeated over that unit's components."""
    return lambdas if len(lambdas) == int(rank.sum()) else lambdas.repeat_interleave(rank[rank > 0])


def combine(scores: torch.Tensor, offset: torch.Tensor, lambdas: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``offset + (scores * lambdas) @ basis``: the adapted output from its scale-independent parts."""
    return offset + (scores * lambdas) @ basis
