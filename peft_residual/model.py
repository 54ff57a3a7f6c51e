"""Injection of ResiDual layers into a supported vision transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .architectures import Architecture
from .config import ResiDualConfig
from .decomposition import UnitTrace
from .layer import ResiDualReadoutLayer, ResiDualTunerLayer, ResiDualUnitLayer


@dataclass(frozen=True)
class _Role:
    kind: str  # "embedding" | "heads" | "mlps" | "readout"
    unit_slice: slice | None = None
    transformed: bool = False


def _roles(arch: Architecture, config: ResiDualConfig) -> dict[str, _Role]:
    """Which module gets which layer: transformed units, mean-replaced units and the readout."""
    layers = range(arch.num_layers) if config.layers is None else config.layers
    bad = [i for i in layers if not 0 <= i < arch.num_layers]
    if bad:
        raise ValueError(f"ResiDualConfig.layers has {bad}, but the model has layers 0..{arch.num_layers - 1}.")
    keep_means = config.rest == "mean"
    spec = arch.spec
    roles = {}
    if keep_means:
        roles[spec.embedding] = _Role("embedding", slice(0, 1))
    for i in range(arch.num_layers):
        heads = i in layers
        mlps = heads and config.units == "heads+mlps"
        if heads or keep_means:
            roles[spec.attention_out.format(i=i)] = _Role("heads", arch.heads_slice(i), heads)
        if mlps or keep_means:
            roles[spec.mlp_out.format(i=i)] = _Role("mlps", arch.mlp_slice(i), mlps)
    roles[arch.readout_path] = _Role("readout")
    return roles


class ResiDualModel(BaseTuner):
    """Injects ResiDual layers (see :mod:`peft_residual.layer`) where the architecture map says the units live.

    Use it through ``peft.get_peft_model(model, ResiDualConfig(...))``.

    Example:
        >>> import peft_residual
        >>> peft_model = get_peft_model(CLIPVisionModelWithProjection(config), peft_residual.ResiDualConfig(k=16))
        >>> peft_residual.fit_residual_bases(peft_model, loader)
        >>> peft_model(pixel_values=x).image_embeds  # ResiDual-adapted
    """

    prefix: str = "residual_"
    tuner_layer_cls = ResiDualTunerLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def _prepare_adapter_config(self, peft_config: ResiDualConfig, model_config: dict) -> ResiDualConfig:
        return peft_config  # target modules come from the architecture map, in _prepare_model

    def _prepare_model(self, peft_config: ResiDualConfig, model: nn.Module) -> None:
        self.arch = Architecture(model)
        if getattr(self, "trace", None) is None:
            self.trace = UnitTrace(self.arch)
        self._module_roles = _roles(self.arch, peft_config)
        peft_config.target_modules = list(self._module_roles)

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
        role = self._module_roles[current_key]
        if not isinstance(target, ResiDualTunerLayer):
            if role.kind == "readout":
                new_module = ResiDualReadoutLayer(target, self.trace)
            else:
                names = self.arch.unit_names[role.unit_slice]
                new_module = ResiDualUnitLayer(target, role.unit_slice, names, role.kind)
            self._replace_module(parent, target_name, new_module, target)
            target = new_module
        if role.kind == "readout":
            target.update_layer(adapter_name, peft_config.rest)
        else:
            target.update_layer(
                adapter_name, role.transformed, peft_config.remainder, inference_mode=peft_config.inference_mode
            )
        if adapter_name not in self.active_adapters:
            target.requires_grad_(False)

    def _post_injection_hook(self, model: nn.Module, config: ResiDualConfig, adapter_name: str) -> None:
        self.readout.unit_layers = sorted(self.unit_layers(), key=lambda layer: layer.unit_slice.start)

    @property
    def readout(self) -> ResiDualReadoutLayer:
        return self.model.get_submodule(self.arch.readout_path)

    def unit_layers(self) -> list[ResiDualUnitLayer]:
        return [module for module in self.model.modules() if isinstance(module, ResiDualUnitLayer)]

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: ResiDualConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check a checkpoint against this model unit by unit, then size the empty layers to receive it."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = set()
        output_dim = Architecture(model).output_dim
        for name, layer in model.named_modules():
            if not isinstance(layer, ResiDualUnitLayer) or adapter_name not in layer.residual_mean:
                continue
            shapes = {}
            for attr in ("residual_mean", "residual_rank", "residual_basis", "residual_lambda"):
                if adapter_name not in getattr(layer, attr):
                    continue
                key = f"{name}.{attr}.{adapter_name}"
                expected.add(key)
                if key not in state_dict:
                    raise ValueError(
                        f"The checkpoint has no {attr} for unit group {layer.unit_names[0]}..{layer.unit_names[-1]} "
                        f"({name}); it was saved for a different model or ResiDualConfig."
                    )
                shapes[attr] = state_dict[key].shape
            _check_shapes(layer, shapes, output_dim)
            layer.allocate(adapter_name, shapes)
        unexpected = sorted(k for k in state_dict if k not in expected)
        if unexpected:
            raise ValueError(
                f"The checkpoint holds ResiDual state this model has no unit for, e.g. {unexpected[0]}; it was saved "
                "for a model with other layers or another ResiDualConfig."
            )
        return state_dict


def _check_shapes(layer: ResiDualUnitLayer, shapes: dict[str, torch.Size], output_dim: int) -> None:
    units = layer.num_units
    first = layer.unit_names[0]
    mean = shapes["residual_mean"]
    if tuple(mean) != (units, output_dim):
        raise ValueError(
            f"Unit {first}: the checkpoint's mean has shape {tuple(mean)}, but this model's units need "
            f"({units}, {output_dim}) ({units} units of output dimension {output_dim}). Load the adapter onto the base "
            "model it was trained for."
        )
    if "residual_rank" not in shapes:
        return
    rank, basis, lambdas = shapes["residual_rank"], shapes["residual_basis"], shapes["residual_lambda"]
    if (
        tuple(rank) != (units,)
        or len(basis) != 2
        or basis[1] != output_dim
        or tuple(lambdas) not in {(basis[0],), (units,)}
    ):
        raise ValueError(
            f"Unit {first}: the checkpoint's rank {tuple(rank)}, basis {tuple(basis)} and scales {tuple(lambdas)} do "
            f"not fit {units} units of output dimension {output_dim}. Load the adapter onto the base model it was "
            "trained for."
        )
