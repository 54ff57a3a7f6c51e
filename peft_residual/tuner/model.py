"""Injection of ResiDual layers into a supported vision transformer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..models import Architecture, check_normalised
from ..packing import packed_size
from ..records import BASE, note_residual, open_record
from .config import ResiDualConfig, ResiDualInputError
from .layer import ResiDualLayer, ResiDualReadoutLayer, ResiDualUnitLayer


@dataclass(frozen=True)
class _Target:
    kind: str  # "embedding" | "heads" | "mlps" | "readout"
    layer: int | None = None
    unit_slice: slice | None = None
    treatments: tuple[str, ...] = ()
    """Per unit, what the adapter does with it (see :data:`~.plan.TREATMENTS`)."""


def _targets(arch: Architecture, config: ResiDualConfig) -> dict[str, _Target]:
    """Every unit module (each records; some transform or keep their mean) and the readout, by module path. The one
    place that reads which units are transformed and what ``rest`` does with the others."""
    layers = range(arch.num_layers) if config.layers is None else config.layers
    bad = [i for i in layers if not 0 <= i < arch.num_layers]
    if bad:
        raise ResiDualInputError(f"ResiDualConfig.layers has {bad}, but the model has layers 0..{arch.num_layers - 1}.")
    heads = set(config.heads or ())
    unknown = sorted(heads - set(arch.unit_names))
    if unknown:
        raise ResiDualInputError(
            f"ResiDualConfig.heads names {unknown[0]}, which this model does not have (layers "
            f"0..{arch.num_layers - 1}, heads 0..{arch.num_heads - 1})."
        )
    slices = {"embedding": lambda _: slice(0, 1), "heads": arch.heads_slice, "mlps": arch.mlp_slice}
    targets = {}
    for path, kind, layer in arch.unit_modules():
        unit_slice = slices[kind](layer)
        names = arch.unit_names[unit_slice]
        if kind == "heads" and config.heads is not None:
            selected = [name in heads for name in names]
        else:
            selected = [kind != "embedding" and layer in layers and kind in config.units.split("+")] * len(names)
        treatments = tuple("transform" if chosen else config.rest for chosen in selected)
        targets[path] = _Target(kind, layer, unit_slice, treatments)
    targets[arch.readout_path] = _Target("readout")
    return targets


def _check_modules_to_save(model: nn.Module, names: list[str], targets: dict[str, _Target]) -> None:
    """Refuse a ``modules_to_save`` entry that is, holds or lies inside a module ResiDual wraps: PEFT would copy
    or wrap ResiDual's own layers."""
    for name in names:
        for key, _ in model.named_modules():
            if key != name and not key.endswith(f".{name}"):
                continue
            clash = next((t for t in targets if t == key or t.startswith(f"{key}.") or key.startswith(f"{t}.")), None)
            if clash is not None:
                raise ResiDualInputError(
                    f"modules_to_save names {name!r}, which is or holds {clash}, a module ResiDual wraps to read out "
                    "its units; it cannot also be trained as a copy. Name modules outside the decomposed tower "
                    "(e.g. a classifier head)."
                )


class ResiDualModel(BaseTuner):
    """Injects ResiDual layers (see :mod:`.layer`) where the architecture map says the units live.

    Use it through ``peft.get_peft_model(model, ResiDualConfig(...))``.

    Example:
        >>> import peft_residual
        >>> peft_model = get_peft_model(CLIPVisionModelWithProjection(config), peft_residual.ResiDualConfig(k=16))
        >>> peft_residual.fit_residual_bases(peft_model, loader)
        >>> peft_model(pixel_values=x).image_embeds  # ResiDual-adapted
    """

    prefix: str = "residual_"
    tuner_layer_cls = ResiDualLayer
    uses_shared_state = True
    """The tuner links the readout to the unit layers, keeps the plans current on moves and casts, and hooks the
    final norm (and open_clip's tower): PEFT's ``inject_adapter_in_model``, which drops the tuner, refuses it with
    that reason."""
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def _prepare_adapter_config(self, peft_config: ResiDualConfig, model_config: dict) -> ResiDualConfig:
        return peft_config  # target modules come from the architecture map, in _prepare_model

    def _prepare_model(self, peft_config: ResiDualConfig, model: nn.Module) -> None:
        self.arch = Architecture(model)
        self.arch.check_outermost(model)
        self._targets = _targets(self.arch, peft_config)
        _check_modules_to_save(model, peft_config.modules_to_save or [], self._targets)
        peft_config.target_modules = list(self._targets)

    def _check_target_module_exists(self, peft_config: ResiDualConfig, key: str) -> bool:
        # the architecture map's paths exactly: PEFT's suffix match would also take timm's patch_embed.norm for norm
        return key in self._targets

    def _create_and_replace(
        self,
        peft_config: ResiDualConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        spec = self._targets[current_key]
        if not isinstance(target, ResiDualLayer):
            if spec.kind == "readout":
                new_module = ResiDualReadoutLayer(target, self.arch)
            else:
                new_module = ResiDualUnitLayer(target, spec.kind, spec.layer, spec.unit_slice, self.arch)
            self._replace_module(parent, target_name, new_module, target)
            target = new_module
        if spec.kind == "readout":
            target.update_layer(adapter_name, peft_config, peft_config.inference_mode)
        else:
            target.update_layer(adapter_name, peft_config, spec.treatments, peft_config.inference_mode)
        if adapter_name not in self.active_adapters:
            target.requires_grad_(False)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version moves the new adapter state to the device of the wrapped module's weight, taking the
        # module's first parameter where it has no weight: a parameterless unit module (timm's and open_clip's
        # Identity layer scale, ls2/ls_2, when the model has no layer scale) has none, and it raises StopIteration.
        # ResiDual layers create their state on the base module's device already, so a plain swap is all it takes.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: ResiDualConfig, adapter_name: str) -> None:
        self.readout.link(self.unit_layers())
        self.refresh()
        if getattr(self, "_refresh_after_load", None) is None:
            self._refresh_after_load = self.register_load_state_dict_post_hook(_refresh_after_load)
        if self.arch.spec.projection_matrix and getattr(self, "_tower_readout", None) is None:
            self._tower_readout = self.arch.tower.register_forward_hook(self.readout.replace_tower_output)
        if getattr(self, "_residual_note", None) is None:
            self._residual_note = self.arch.final_norm.register_forward_pre_hook(note_residual)

    def refresh(self) -> None:
        """Rebuild every fitted adapter's readout plan from the stored state (after a fit, load or move)."""
        readout = self.model.get_submodule(self.arch.readout_path) if hasattr(self, "arch") else None
        if isinstance(readout, ResiDualReadoutLayer):
            readout.refresh()

    def _apply(self, fn, recurse: bool = True):
        # the packed bases are a storage format in basis_dtype (unpacked in float64 to build the readout): they follow
        # the model to its device, not to its dtype, so that a cast model still saves what its config says
        packed = [(layer, name, basis) for layer in self.unit_layers() for name, basis in layer.residual_basis.items()]
        result = super()._apply(fn, recurse)
        for layer, name, basis in packed:
            layer.residual_basis[name] = basis.to(layer.residual_basis[name].device)
        self.refresh()  # moved or cast: the plans follow, in float32 (float64 for a float64 model)
        return result

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        readout = self.readout
        # every fitted adapter keeps its plan; only one that has none yet is built (rebuilding all of them cost 0.2 s
        # per adapter on DINOv2-S at every switch)
        readout.refresh([name for name in readout.active_adapters if name not in readout.residual_plan])

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Per call: checks the pixels, and serves PEFT's ``adapter_names`` (one adapter per sample, ``"__base__"``
        for the base model) through the record of this pass, never through module state."""
        pixel_values = kwargs.get("pixel_values", args[0] if args and not self.arch.spec.keyword_input else None)
        names = kwargs.get("adapter_names")
        if names is not None:
            self.check_adapter_names(names)
        if isinstance(pixel_values, torch.Tensor):
            check_normalised(pixel_values, "forward", in_forward=True)  # the fit's rule: no raw pixels
            size = tuple(pixel_values.shape[-2:])
            for name in dict.fromkeys(names or self.active_adapters):
                if name != BASE:
                    self.arch.check_image_size(name, self.peft_config[name].base_signature, image_size=size)
        # a forward that raises leaves no record of its pass behind; PEFT's adapter_names go in this pass's record
        fields = {"adapter_names": tuple(names)} if names is not None else {}
        with open_record(**fields):
            yield

    def check_adapter_names(self, names: Any) -> None:
        """Refuse ``adapter_names`` that are not a list of this model's adapters (or ``"__base__"``)."""
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise ResiDualInputError(f"adapter_names must be a list of adapter names, one per sample; got {names!r}.")
        unknown = sorted(set(names) - set(self.peft_config) - {BASE})
        if unknown:
            raise ResiDualInputError(
                f"adapter_names names unknown adapter(s) {unknown}; the model has {sorted(self.peft_config)} (and "
                f"{BASE!r} for the base model)."
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._enable_peft_forward_hooks(*args, **kwargs):
            return self.model.forward(*args, **kwargs)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:  # PEFT would fold into each wrapped module and drop the wrappers, losing the readout
            raise NotImplementedError(
                "ResiDual rescales output-space units read out at the CLS token and cannot be merged into the base "
                "weights. For faster inference, merge_adapter() folds the scales into the readout and keeps the "
                "PeftModel; unload() gives the base model back."
            )
        for hook in ("_tower_readout", "_residual_note"):
            if getattr(self, hook, None) is not None:
                getattr(self, hook).remove()
                setattr(self, hook, None)
        return super()._unload_and_optionally_merge(merge=False, **kwargs)

    @property
    def readout(self) -> ResiDualReadoutLayer:
        return self.model.get_submodule(self.arch.readout_path)

    def unit_layers(self) -> list[ResiDualUnitLayer]:
        return [module for module in self.model.modules() if isinstance(module, ResiDualUnitLayer)]

    @contextmanager
    def each_adapter(self, adapter_names: list[str]) -> Iterator[None]:
        """The next forward pass in the block returns, for its whole batch, the output of each of ``adapter_names``
        in turn (``"__base__"``: the base model's), stacked along the batch dimension: one backbone pass for many
        adapters."""
        self.check_adapter_names(adapter_names)
        with open_record(stacked=tuple(adapter_names)):
            yield

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: ResiDualConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check a checkpoint against this model unit by unit, then size the empty layers to receive it."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        arch = Architecture(model)
        if config.base_signature is None:
            raise ResiDualInputError(
                f"The config of adapter '{adapter_name}' has no base_signature, so nothing says which base model its "
                "bases belong to; it was saved unfitted or by an older version. Fit it and save it again."
            )
        arch.check_signature(config.base_signature)
        expected = set()
        for name, layer in model.named_modules():
            if not isinstance(layer, ResiDualUnitLayer) or not layer.holds(adapter_name):
                continue
            tensors = {}
            for attr in ResiDualUnitLayer.stored_names:
                if adapter_name not in getattr(layer, attr):
                    continue
                key = f"{name}.{attr}.{adapter_name}"
                expected.add(key)
                if key not in state_dict:
                    raise ResiDualInputError(
                        f"The checkpoint has no {attr} for unit group {layer.unit_names[0]}..{layer.unit_names[-1]} "
                        f"({name}); it was saved for a different model or ResiDualConfig."
                    )
                tensors[attr] = state_dict[key]
            _check_shapes(layer, adapter_name, tensors, layer.stored_dim(adapter_name))
            layer.store(adapter_name, {attr: torch.zeros_like(tensor) for attr, tensor in tensors.items()})
        unexpected = sorted(k for k in state_dict if k not in expected and _is_residual_key(k))
        if unexpected:
            raise ResiDualInputError(
                f"The checkpoint holds ResiDual state this model has no unit for, e.g. {unexpected[0]}; it was saved "
                "for a model with other layers or another ResiDualConfig."
            )
        return state_dict


def _is_residual_key(key: str) -> bool:
    """Whether a checkpoint key holds ResiDual state (others are PEFT's, e.g. a ``modules_to_save`` copy)."""
    return any(f".{name}." in key for name in ResiDualUnitLayer.stored_names)


def _check_shapes(layer: ResiDualUnitLayer, adapter_name: str, tensors: dict[str, torch.Tensor], dim: int) -> None:
    units = layer.num_units
    first = layer.unit_names[0]
    mean = tuple(tensors["residual_mean"].shape)
    if mean != (units, dim):
        raise ResiDualInputError(
            f"Unit {first}: the checkpoint's mean has shape {mean}, but this model's units need "
            f"({units}, {dim}) ({units} units of stored dimension {dim}). Load the adapter onto the base "
            "model it was trained for."
        )
    if "residual_rank" not in tensors:
        return
    rank, basis, lambdas = (tensors[key] for key in ("residual_rank", "residual_basis", "residual_lambda"))
    if basis.dim() != 1:
        raise ResiDualInputError(
            f"Unit {first}: the checkpoint stores its basis as a {tuple(basis.shape)} matrix, the format of "
            "peft_residual before bases were packed as Householder reflectors. Refit the adapter with this version "
            "(fit_residual_bases) and save it again."
        )
    components = [int(k) for k in rank.tolist()] if tuple(rank.shape) == (units,) else None
    per_unit = layer.residual_config[adapter_name].scale_per == "unit"
    if (
        components is None
        or not all(0 <= k <= dim for k in components)
        or components
        != [k if chosen else 0 for k, chosen in zip(components, layer.selected(adapter_name), strict=True)]
        or len(basis) != sum(packed_size(k, dim) for k in components)
        or tuple(lambdas.shape) != (sum(k > 0 if per_unit else k for k in components),)
    ):
        raise ResiDualInputError(
            f"Unit {first}: the checkpoint's rank {tuple(rank.shape)}, basis {tuple(basis.shape)} and scales "
            f"{tuple(lambdas.shape)} do not fit {units} units of stored dimension {dim}. Load the adapter onto the "
            "base model it was trained for."
        )


def _refresh_after_load(tuner: ResiDualModel, incompatible_keys: Any) -> None:
    tuner.refresh()


def residual_tuner(model: nn.Module) -> ResiDualModel:
    """The :class:`ResiDualModel` inside ``model`` (a ``PeftModel``, or the tuner itself)."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, ResiDualModel):
        raise ResiDualInputError(
            f"This needs a model from get_peft_model(model, ResiDualConfig(...)), got {type(model).__name__}."
        )
    return tuner
