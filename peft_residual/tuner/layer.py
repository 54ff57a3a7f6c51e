"""ResiDual tuner layers. The residual stream itself is never changed.

A :class:`ResiDualUnitLayer` wraps each module that produces units (the embedding, a layer's attention output
projection, an MLP): it passes the output through, hands the CLS piece to the running pass's record
(:mod:`peft_residual.records`), and holds per adapter the units' PCA bases, means and trainable scales. The
:class:`ResiDualReadoutLayer` wraps the module producing the output (the projection, else the final norm; a bare
projection matrix through a hook on its tower) and replaces that output by the adapted one: a forward folds each
piece in as it arrives (:mod:`.fold`); the training cache reads out stored scores (:mod:`.plan`). Both are built
from the same stored state.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..errors import warn_caller
from ..models import Architecture
from ..packing import packed_size, unpack_orthonormal
from ..records import BASE, UnitRecord, capture, current_record, take_record
from .config import ResiDualConfig, ResiDualInputError
from .decomposition import contributions
from .fold import Fold, build_fold
from .head_space import HeadFrames, head_frames
from .plan import Components, LayerState, OutputSpace, ReadoutPlan, build_plan, readout


def active_adapter(module: BaseTuner | BaseTunerLayer) -> str:
    """The one adapter ``module`` (a ResiDual layer or the tuner) runs: ResiDual runs one adapter at a time."""
    names = module.active_adapters
    if len(names) != 1:
        raise ResiDualInputError(f"ResiDual runs one adapter at a time, but {names} are active.")
    return names[0]


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
    other_param_names: tuple[str, ...] = ("residual_config",)

    def _init_tuner_layer(self, base_layer: nn.Module, arch: Architecture) -> None:
        self.base_layer = base_layer
        self.arch = arch
        # PEFT's layer attributes: a linear module's own, else the stream's width (a norm or MLP maps it to itself)
        self.in_features = getattr(base_layer, "in_features", arch.hidden_size)
        self.out_features = getattr(base_layer, "out_features", arch.hidden_size)
        self._disable_adapters = False
        self.merged_adapters = []
        self.residual_config: dict[str, ResiDualConfig] = {}
        """Per adapter, its config (the tuner's own object): the one owner of every setting."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Nothing to fold in a unit layer: the readout layer folds the scales (:meth:`ResiDualReadoutLayer.merge`)."""

    def unmerge(self) -> None:
        """See :meth:`merge`."""

    def _base_device(self) -> torch.device:
        tensor = next(self.get_base_layer().parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")


class ResiDualUnitLayer(nn.Module, ResiDualLayer):
    """Captures and holds the ResiDual state of the units produced by one module.

    Per adapter: ``residual_treatments`` (per unit, one of :data:`~.plan.TREATMENTS`); ``residual_mean``
    ``[units, dim]`` where a unit is transformed or replaced by its mean; where one is transformed also
    ``residual_rank`` ``[units]`` (0 for a unit that is not), ``residual_basis`` (the units' orthonormal rows packed
    as Householder reflectors, :mod:`peft_residual.packing`) and the trainable ``residual_lambda`` ``[sum(rank)]``
    (one per unit with ``scale_per="unit"``). ``dim`` is the output's, or for heads their head coordinates'
    (:mod:`.head_space`).
    """

    other_param_names: tuple[str, ...] = (
        *ResiDualLayer.other_param_names,
        "residual_basis",
        "residual_mean",
        "residual_rank",
        "residual_treatments",
    )
    stored_names: tuple[str, ...] = ("residual_mean", "residual_rank", "residual_basis", "residual_lambda")
    """What an adapter's checkpoint holds per unit layer (the state-dict attributes)."""
    captures_units = True
    """Read by :func:`peft_residual.recording.recording`: this module stores its own CLS piece."""

    __getattr__ = _getattr_or_base

    def __init__(
        self, base_layer: nn.Module, kind: str, layer: int | None, unit_slice: slice, arch: Architecture, **kwargs
    ) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer, arch)
        self.kind = kind
        self.layer = layer
        self.unit_slice = unit_slice
        self.unit_names = arch.unit_names[unit_slice]
        self.readout: tuple[ResiDualReadoutLayer, ...] = ()
        """The readout reading these units (a tuple: a reference, not a submodule), set by its link."""
        self.residual_lambda = nn.ParameterDict({})
        self.residual_basis = BufferDict({}, persistent=True)
        self.residual_mean = BufferDict({}, persistent=True)
        self.residual_rank = BufferDict({}, persistent=True)
        self.residual_treatments: dict[str, tuple[str, ...]] = {}

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    def update_layer(
        self, adapter_name: str, config: ResiDualConfig, treatments: tuple[str, ...], inference_mode: bool = False
    ) -> None:
        """Create empty state for ``adapter_name``; :meth:`store` fills it (a fit, or a checkpoint load)."""
        device = self._base_device()
        self.residual_config[adapter_name] = config
        self.residual_treatments[adapter_name] = treatments
        if self.holds(adapter_name):
            self.residual_mean[adapter_name] = torch.empty(0, device=device)
        if self.is_transformed(adapter_name):
            self.residual_rank[adapter_name] = torch.empty(0, dtype=torch.long, device=device)
            self.residual_basis[adapter_name] = torch.empty(0, device=device)
            # in the base's dtype, as PEFT creates adapter weights: its autocast_adapter_dtype (on by default) then
            # upcasts float16/bfloat16 to float32, and a fit keeps whatever dtype this ends up with
            dtype = next(self.get_base_layer().parameters(), torch.empty(0)).dtype
            self.residual_lambda[adapter_name] = nn.Parameter(torch.empty(0, device=device, dtype=dtype))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def holds(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` stores state here: a unit transformed or replaced by its mean."""
        return bool({"transform", "mean"} & set(self.residual_treatments.get(adapter_name, ())))

    def is_transformed(self, adapter_name: str) -> bool:
        return "transform" in self.residual_treatments.get(adapter_name, ())

    def selected(self, adapter_name: str) -> list[bool]:
        """Per unit, whether ``adapter_name`` transforms it."""
        return [t == "transform" for t in self.residual_treatments.get(adapter_name, ("sum",) * self.num_units)]

    def is_fitted(self, adapter_name: str) -> bool:
        return self.residual_mean[adapter_name].numel() > 0

    @property
    def in_head_space(self) -> bool:
        return self.kind == "heads"

    def max_rank(self, adapter_name: str) -> int:
        """The most components a unit of this layer can have under the adapter's convention."""
        config = self.residual_config[adapter_name]
        return self.arch.max_rank(self.kind, config.ln_mean, config.centre)

    def stored_dim(self, adapter_name: str) -> int:
        """The width of this layer's stored means and bases for ``adapter_name``."""
        return self.max_rank(adapter_name) if self.in_head_space else self.arch.output_dim

    def frames(self, adapter_name: str) -> HeadFrames | None:
        """Head coordinates (see :mod:`.head_space`) for a layer of heads, else ``None``."""
        if not self.in_head_space:
            return None
        config = self.residual_config[adapter_name]
        return head_frames(self.arch, self.layer, config.ln_mean, config.centre)

    @torch.no_grad()
    def store(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Set the state of ``adapter_name`` (:attr:`stored_names`) to a fit's or a checkpoint's ``tensors``, on the
        base module's device; the scales keep their dtype (PEFT's autocast_adapter_dtype chose it) and trainability."""
        device = self._base_device()
        for name, tensor in tensors.items():
            if name == "residual_lambda":
                empty = self.residual_lambda[adapter_name]
                self.residual_lambda[adapter_name] = nn.Parameter(
                    tensor.to(device, empty.dtype), requires_grad=empty.requires_grad
                )
            else:
                getattr(self, name)[adapter_name] = tensor.to(device)

    @torch.no_grad()
    def output_space(self, adapter_name: str) -> OutputSpace:
        """The stored mean and components in output space, unpacked in float64."""
        mean = self.residual_mean[adapter_name].double().cpu()
        frames = self.frames(adapter_name)
        if frames is not None:
            mean = torch.einsum("nor,nr->no", frames[0], mean) + frames[1]
        if not self.is_transformed(adapter_name):
            return OutputSpace(mean, mean.new_zeros(0, mean.shape[1]), [0] * self.num_units)
        rank = self.residual_rank[adapter_name].cpu().tolist()
        dim = self.stored_dim(adapter_name)
        packed = self.residual_basis[adapter_name].cpu().split([packed_size(k, dim) for k in rank])
        rows = []
        for unit, (unit_rank, unit_packed) in enumerate(zip(rank, packed, strict=True)):
            coefficients = unpack_orthonormal(unit_packed, unit_rank, dim)
            rows.append(coefficients @ frames[0][unit].T if frames is not None else coefficients)
        return OutputSpace(mean, torch.cat(rows), rank)

    def plan_state(self, adapter_name: str) -> LayerState:
        """What the readout plan of ``adapter_name`` reads of this layer."""
        space = self.output_space(adapter_name) if self.holds(adapter_name) else None
        return LayerState(self.kind, self.unit_slice.start, self.residual_treatments[adapter_name], space)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.kind != "heads":
            output = self.base_layer(*args, **kwargs)
            # the embedding opens the pass: its readout says what the pass folds
            folds_for = self.readout[0].folds_for if self.kind == "embedding" and self.readout else None
            capture(self.arch, self.kind, self.layer, args, output, folds_for)
            return output
        if not self._heads_read():  # the module itself: the base model's output bit for bit
            return self.base_layer(*args, **kwargs)
        output, heads, projected = self.arch.run_attention(self.base_layer, args, kwargs)
        capture(self.arch, self.kind, self.layer, (heads,), projected)
        return output

    def _heads_read(self) -> bool:
        """Whether this pass reads the heads: always where they enter the output projection anyway; for an
        ``nn.MultiheadAttention`` (run in steps to expose them) only when recording or reading out an adapter."""
        if not self.arch.spec.multihead_attention:
            return True
        record = current_record()
        return record is not None and (record.kept or (record.reads_adapters() and not self.disable_adapters))


class ResiDualReadoutLayer(nn.Module, ResiDualLayer):
    """Wraps the output module (projection, else final norm) and returns the adapted output; of a final norm over
    the whole sequence (DINOv2) only the CLS position, the other tokens being the base model's."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = (*ResiDualLayer.other_param_names, "residual_plan", "residual_fold")

    __getattr__ = _getattr_or_base

    def __init__(self, base_layer: nn.Module, arch: Architecture, **kwargs) -> None:
        super().__init__()
        self._init_tuner_layer(base_layer, arch)
        self.unit_layers: list[ResiDualUnitLayer] = []
        self.residual_plan: dict[str, ReadoutPlan] = {}
        """Per fitted adapter, its training readout, built from the unit layers' state (never saved)."""
        self.residual_fold: dict[str, Fold] = {}
        """Per fitted adapter, its forward's readout (never saved): live, or merged (:meth:`merge`)."""

    def update_layer(self, adapter_name: str, config: ResiDualConfig, inference_mode: bool = False) -> None:
        self.residual_config[adapter_name] = config
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def link(self, unit_layers: list[ResiDualUnitLayer]) -> None:
        """Read the units of ``unit_layers``, in unit order."""
        self.unit_layers = sorted(unit_layers, key=lambda layer: layer.unit_slice.start)
        for layer in self.unit_layers:
            layer.readout = (self,)

    def layers_of(self, adapter_name: str) -> list[ResiDualUnitLayer]:
        """The unit layers taking part in ``adapter_name``, in unit order."""
        return [layer for layer in self.unit_layers if layer.holds(adapter_name)]

    def transformed_layers(self, adapter_name: str) -> list[ResiDualUnitLayer]:
        """The layers whose ``residual_lambda``, concatenated in this order, are the adapter's scales."""
        return [layer for layer in self.unit_layers if layer.is_transformed(adapter_name)]

    def fitted_adapters(self) -> list[str]:
        """The adapters with PCA bases, in the order they were added."""
        return [name for name in self.residual_config if self.is_fitted(name)]

    def is_fitted(self, adapter_name: str) -> bool:
        layers = self.layers_of(adapter_name)
        return bool(layers) and all(layer.is_fitted(adapter_name) for layer in layers)

    def check_fitted(self, adapter_name: str) -> None:
        unfitted = [layer.unit_names[0] for layer in self.layers_of(adapter_name) if not layer.is_fitted(adapter_name)]
        if unfitted:
            raise RuntimeError(
                f"ResiDual adapter '{adapter_name}' has no PCA bases yet (first unfitted unit: {unfitted[0]}). Call "
                "peft_residual.fit_residual_bases(model, dataloader) on reference images, or load a saved adapter."
            )

    @torch.inference_mode(False)  # a merge or move inside inference_mode still builds tensors a backward can save
    def refresh(self, adapter_names: list[str] | None = None) -> None:
        """Rebuild the :class:`ReadoutPlan` of each fitted adapter (all by default) from the stored state, and
        refold the merged ones with their scales as they are now."""
        self.merged_adapters = [name for name in self.merged_adapters if name in self.residual_config]
        for name in adapter_names if adapter_names is not None else list(self.residual_config):
            self.residual_plan.pop(name, None)
            self.residual_fold.pop(name, None)
            if name in self.residual_config and self.is_fitted(name):
                dtype = torch.promote_types(torch.float32, next(self.get_base_layer().parameters()).dtype)
                config, device = self.residual_config[name], self._base_device()
                states = [layer.plan_state(name) for layer in self.unit_layers]
                self.residual_plan[name] = build_plan(states, config, self.arch, device, dtype)
                merged = {}
                if name in self.merged_adapters:
                    scales = torch.cat([scale.detach().double() for scale in self.scales(name)])
                    merged = {"scales": scales, "snapshot": self.lambdas(name).detach()}
                self.residual_fold[name] = build_fold(states, config, self.arch, device, dtype, **merged)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the scales of ``adapter_names`` (the active adapters by default) into their readout for inference
        (:mod:`.fold`). As with any PEFT merge, the output follows the scales as they were at the merge (or the last
        fit, load or move) until :meth:`unmerge`; the base weights are never touched."""
        for name in check_adapters_to_merge(self, adapter_names):
            self.check_fitted(name)
            self.merged_adapters.append(name)
            self.refresh([name])
            # the merged maps are all columns of the fold's one [output_dim, in] map: one check covers them
            if safe_merge and not torch.isfinite(self.residual_fold[name].rows).all():
                self.unmerge()
                raise ValueError(f"Merging ResiDual adapter '{name}' gives non-finite values; its scales are broken.")

    def unmerge(self) -> None:
        """Read out from the live scales again."""
        if not self.merged:
            warn_caller("Already unmerged. Nothing to do.")
        merged, self.merged_adapters = self.merged_adapters, []
        self.refresh(merged)

    def plan(self, adapter_name: str) -> ReadoutPlan:
        if adapter_name not in self.residual_plan:
            self.check_fitted(adapter_name)
            raise RuntimeError(f"ResiDual adapter '{adapter_name}' was fitted but not refreshed; call refresh().")
        return self.residual_plan[adapter_name]

    # What training and inference read and write of an adapter: nothing outside the tuner touches its tensors.

    def scales(self, adapter_name: str) -> list[nn.Parameter]:
        """The adapter's trainable scales, one tensor per transformed unit layer in unit order (as its checkpoint
        stores them)."""
        return [layer.residual_lambda[adapter_name] for layer in self.transformed_layers(adapter_name)]

    @torch.no_grad()
    def set_scales(self, adapter_name: str, values: torch.Tensor) -> None:
        """Copy ``values``, the adapter's scales concatenated in :meth:`scales`' order, into it (in its dtype)."""
        scales = self.scales(adapter_name)
        for scale, part in zip(scales, values.split([len(scale) for scale in scales]), strict=True):
            scale.copy_(part)

    @torch.no_grad()
    def cast_bases(self, adapter_name: str, dtype: torch.dtype) -> None:
        """Store the adapter's packed bases in ``dtype`` (as ``basis_dtype`` would have fitted them) and rebuild its
        readout from them."""
        for layer in self.transformed_layers(adapter_name):
            layer.residual_basis[adapter_name] = layer.residual_basis[adapter_name].to(dtype)
        self.residual_config[adapter_name].basis_dtype = str(dtype).removeprefix("torch.")
        self.refresh([adapter_name])

    def components(self, adapter_name: str) -> Components:
        """The adapter's components in output space, in score order (as :meth:`scores_and_offset` gives the
        scores), and which of its scales each takes."""
        return self.plan(adapter_name).score_order

    def lambdas(self, adapter_name: str) -> torch.Tensor:
        """The adapter's scales, one per component in score order."""
        empty = self.plan(adapter_name).basis.new_zeros(0)
        scales = torch.cat([*(s.to(empty.dtype) for s in self.scales(adapter_name)), empty])
        return self.components(adapter_name).scales(scales)

    def fitted_state(self, adapter_name: str) -> list[torch.Tensor]:
        """The means and packed bases the adapter's scales act on, in unit order (what a training run
        fingerprints)."""
        state = []
        for layer in self.layers_of(adapter_name):
            state.append(layer.residual_mean[adapter_name])
            if layer.is_transformed(adapter_name):
                state.append(layer.residual_basis[adapter_name])
        return state

    def scores_and_offset(self, adapter_name: str, record: UnitRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """PCA scores ``[batch, components]`` of the pieces of one recorded pass, and the part of the output the
        scales do not touch: ``readout(scores, lambdas(), components().basis, offset)`` is the adapted output."""
        plan = self.plan(adapter_name)
        units = contributions(record, self.arch, self.residual_config[adapter_name].ln_mean, plan.shares)
        units = units.to(plan.basis.dtype)
        padded = plan.scores(units)
        offset = readout(padded, plan.lambda_shift, plan.basis, plan.offset(units))
        return padded[:, plan.components], offset

    def folds_for(self, record: UnitRecord) -> dict[str, Fold] | None:
        """What a pass folds as its pieces arrive (called when its embedding does): the fold of each adapter it
        reads out, none with the adapters disabled. ``None`` (keep every piece): when gradients must reach the
        weights the folds hold as they were built, and for a half-precision model, whose own residual stream rounds
        at every block (a fold scales by the statistics of the residual the norm receives; the kept pieces sum to
        it in float32, as the cache does)."""
        if self.disable_adapters:
            return {}
        half = next(self.get_base_layer().parameters()).dtype.itemsize < 4
        if half or (torch.is_grad_enabled() and self.arch.readout_weights_require_grad()):
            return None
        names = record.stacked if record.stacked is not None else record.adapter_names
        names = self.active_adapters if names is None else dict.fromkeys(names)
        return {name: self.residual_fold[name] for name in names if name in self.residual_fold}

    def adapt_exactly(self, adapter_name: str, record: UnitRecord) -> torch.Tensor:
        """The ResiDual output from a pass's kept pieces, through their contributions in output space (the
        training cache's arithmetic)."""
        fold = self.residual_fold.get(adapter_name)
        scores, offset = self.scores_and_offset(adapter_name, record)
        lambdas = fold.lambdas if fold is not None and fold.merged else self.lambdas(adapter_name)
        return readout(scores, lambdas, self.components(adapter_name).basis, offset)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.arch.spec.projection_matrix:  # the tower applies its matrix after this: its output is replaced
            return result
        return self.replace_output(result)

    def replace_tower_output(self, tower: nn.Module, args: tuple, output: Any) -> Any:
        """A forward hook on a tower whose forward applies a projection matrix after the final norm (open_clip):
        its output (the first one of a tuple) is replaced."""
        if isinstance(output, tuple):
            return (self.replace_output(output[0]), *output[1:])
        return self.replace_output(output)

    def replace_output(self, result: torch.Tensor) -> torch.Tensor:
        """What the model gets instead of the readout module's ``result``: the adapted output of this pass."""
        record = take_record()  # always: the record of this pass closes here
        if record is None or record.kept or self.disable_adapters:
            return result
        if record.stacked is not None:  # many tasks from one backbone pass
            return torch.cat([self.output(name, record, result) for name in record.stacked])
        if record.adapter_names is not None:
            return self.mixed_output(record, result)
        if not self.active_adapters:
            return result
        return self.output(active_adapter(self), record, result)

    def output(self, adapter_name: str, record: UnitRecord, result: torch.Tensor) -> torch.Tensor:
        """What this module returns for ``adapter_name``: the base module's ``result`` (for :data:`BASE` as it is)
        with the adapted output at CLS, in a new tensor (``result`` may be held by a hook, or be a custom autograd
        Function's output that allows no in-place write)."""
        if adapter_name == BASE:
            return result
        signature = self.residual_config[adapter_name].base_signature
        self.arch.check_image_size(adapter_name, signature, num_tokens=record.num_tokens)
        if record.folds is None:
            adapted, onto_base = self.adapt_exactly(adapter_name, record), False
        else:
            fold = record.folds.get(adapter_name)
            if fold is None:  # not fitted (plan() says so), or not read out when the pass started
                self.plan(adapter_name)
                raise RuntimeError(f"ResiDual adapter '{adapter_name}' was not read out when this pass began.")
            scales = self.scales(adapter_name)
            adapted, onto_base = fold.output(record.folded.get(adapter_name), scales, record.residual), fold.base
        cls = result[:, 0] if result.dim() == 3 else result
        adapted = cls + adapted if onto_base else adapted.to(result.dtype)  # onto_base: the fold starts from it
        if result.dim() == 3:  # a final norm over the whole sequence: only the CLS token is ResiDual's
            return torch.cat([adapted.unsqueeze(1), result[:, 1:]], dim=1)
        return adapted

    def mixed_output(self, record: UnitRecord, result: torch.Tensor) -> torch.Tensor:
        """Each sample's output under its own adapter (``record.adapter_names``): every adapter named reads out the
        whole batch, as it would alone, and each sample takes its own adapter's row, so it equals that adapter's
        output exactly."""
        names = record.adapter_names
        if len(names) != len(result):
            raise ResiDualInputError(f"adapter_names has {len(names)} names for a batch of {len(result)} images.")
        distinct = list(dict.fromkeys(names))
        outputs = torch.stack([self.output(name, record, result) for name in distinct])
        chosen = torch.tensor([distinct.index(name) for name in names], device=outputs.device)
        return outputs[chosen, torch.arange(len(names), device=outputs.device)]
