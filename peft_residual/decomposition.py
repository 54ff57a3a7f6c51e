"""Unit decomposition: the pooled (or projected) CLS output as an exact sum of per-unit direct contributions.

For a pre-LN ViT the CLS residual entering the final norm is ``r = e + sum_l (sum_h a_lh + m_l)``: the embedding, every
attention head (its slice of the output projection applied to that head's output, plus ``bias / H``, times any layer
scale) and every MLP. Freezing the final LayerNorm's per-sample statistics ``mean(r)`` and ``std(r)`` makes it linear,
so each unit ``u`` gets a direct contribution ``gamma * (u - mean(u)) / std(r) + beta_share``, followed by the
projection where the model has one. The norm's (and the projection's) bias is shared ``1 / (2L + 1)`` per residual
block, an attention block's share split evenly among its heads, so the contributions sum exactly to the model's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .architectures import Architecture


class UnitTrace:
    """Records, through forward hooks, the raw CLS pieces each unit adds to the residual stream.

    The hooks sit on the base modules named by the architecture map and survive PEFT wrapping. After a forward pass,
    :meth:`contributions` turns the recording into direct contributions in output space.

    Example:
        >>> trace = UnitTrace(Architecture(model))
        >>> _ = model(pixel_values=x)
        >>> trace.contributions().shape  # [batch, units, output_dim]
        torch.Size([8, 157, 512])
    """

    def __init__(self, arch: Architecture) -> None:
        self.arch = arch
        self._embedding: torch.Tensor | None = None
        self._heads: dict[int, torch.Tensor] = {}
        self._mlps: dict[int, torch.Tensor] = {}
        self._handles = [arch.module(arch.spec.embedding).register_forward_hook(self._record_embedding)]
        for layer in range(arch.num_layers):
            attention_out = arch.module(arch.spec.attention_out, layer)
            mlp_out = arch.module(arch.spec.mlp_out, layer)
            self._handles.append(attention_out.register_forward_pre_hook(self._recorder(self._heads, layer, True)))
            self._handles.append(mlp_out.register_forward_hook(self._recorder(self._mlps, layer, False)))

    def _record_embedding(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._embedding = output[:, 0].detach()

    @staticmethod
    def _recorder(store: dict[int, torch.Tensor], layer: int, from_input: bool):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | None = None) -> None:
            store[layer] = (args[0] if from_input else output)[:, 0].detach()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self._embedding = None
        self._heads.clear()
        self._mlps.clear()

    def raw_units(self) -> torch.Tensor:
        """The recorded units as they enter the residual stream at CLS, ``[batch, units, hidden]`` in float32."""
        arch = self.arch
        if self._embedding is None or len(self._heads) != arch.num_layers or len(self._mlps) != arch.num_layers:
            raise RuntimeError("No complete forward pass was recorded; run the model on pixel_values first.")
        batch = self._embedding.shape[0]
        units = [self._embedding.float().unsqueeze(1)]
        for layer in range(arch.num_layers):
            out_proj = arch.module(arch.spec.attention_out, layer)
            weight = out_proj.weight.float().view(arch.hidden_size, arch.num_heads, arch.head_dim)
            head_inputs = self._heads[layer].float().view(batch, arch.num_heads, arch.head_dim)
            heads = torch.einsum("bhk,dhk->bhd", head_inputs, weight)
            if out_proj.bias is not None:
                heads = heads + out_proj.bias.float() / arch.num_heads
            scale = arch.attention_layer_scale(layer)
            if scale is not None:
                heads = heads * scale.float()
            units += [heads, self._mlps[layer].float().unsqueeze(1)]
        return torch.cat(units, dim=1)

    def contributions(self) -> torch.Tensor:
        """Direct contributions in output space, ``[batch, units, output_dim]`` in float32; they sum to the output."""
        return linearise(self.raw_units(), self.arch)


def bias_shares(arch: Architecture) -> torch.Tensor:
    """Each unit's share of a constant added after the residual stream: ``1/(2L+1)`` per block, split among heads."""
    blocks = 2 * arch.num_layers + 1
    shares = torch.full((arch.num_units,), 1.0 / blocks)
    for layer in range(arch.num_layers):
        shares[arch.heads_slice(layer)] = 1.0 / (blocks * arch.num_heads)
    return shares


def linearise(raw_units: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """Push raw residual units through the final norm, frozen at each sample's statistics, and the projection."""
    norm = arch.final_norm
    residual = raw_units.sum(dim=1)
    std = torch.sqrt(residual.var(dim=-1, unbiased=False) + norm.eps)
    centred = raw_units - raw_units.mean(dim=-1, keepdim=True)
    shares = bias_shares(arch).to(raw_units)
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


@contextmanager
def traced(model: nn.Module) -> Iterator[UnitTrace]:
    """Attach a :class:`UnitTrace` to ``model`` for the duration of the block."""
    trace = UnitTrace(Architecture(model))
    try:
        yield trace
    finally:
        trace.remove()


@dataclass
class Units:
    """Direct contributions ``[batch, units, output_dim]`` and the unit names along dimension 1."""

    contributions: torch.Tensor
    names: list[str]


@torch.no_grad()
def decompose_units(model: nn.Module, pixel_values: torch.Tensor) -> Units:
    """Decompose the model's pooled (or projected) CLS output into per-unit direct contributions.

    ``contributions.sum(1)`` equals the base model's ``pooler_output`` (``image_embeds`` with a projection).

    Example:
        >>> units = decompose_units(CLIPVisionModelWithProjection(config), pixel_values)
        >>> torch.allclose(units.contributions.sum(1), model(pixel_values=pixel_values).image_embeds, atol=1e-5)
        True
    """
    with traced(model) as trace:
        run_backbone(model, pixel_values)
        return Units(trace.contributions(), list(trace.arch.unit_names))


@contextmanager
def adapters_bypassed(model: nn.Module) -> Iterator[None]:
    """Pass every PEFT layer of ``model`` through for the block, without touching which parameters train."""
    tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in tuner_layers:
        layer._disable_adapters = True  # not enable_adapters(False): that would also freeze the scales
    try:
        yield
    finally:
        for layer in tuner_layers:
            layer._disable_adapters = False


def run_backbone(model: nn.Module, pixel_values: torch.Tensor) -> None:
    """Run the base vision backbone of ``model`` on ``pixel_values``, with any PEFT layers passed through."""
    with adapters_bypassed(model):
        Architecture(model).tower(pixel_values=pixel_values)


def embed_images(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's image embedding: ``image_embeds`` with a projection, else ``pooler_output``.

    For a ``PeftModel`` with an active ResiDual adapter this is the adapted embedding.
    """
    arch = Architecture(model)
    if arch.spec.vision_config:  # two-tower model: only the image side runs
        return model.get_image_features(pixel_values=pixel_values).pooler_output
    output = model(pixel_values=pixel_values)
    embeds = getattr(output, "image_embeds", None)
    return output.pooler_output if embeds is None else embeds


@torch.no_grad()
def embed_batches(
    model: nn.Module, batches: Iterable[dict], label_column: str = "label", base: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings (float32, on CPU) and labels of every batch; ``base=True`` bypasses any adapter.

    Example:
        >>> features, labels = embed_batches(peft_model, DataLoader(test, batch_size=64))
        >>> accuracy(classifier(features), labels)
    """
    device = next(model.parameters()).device
    features, labels = [], []
    with adapters_bypassed(model) if base else nullcontext():
        for batch in batches:
            features.append(embed_images(model, batch["pixel_values"].to(device)).float().cpu())
            labels.append(torch.as_tensor(batch[label_column]))
    return torch.cat(features), torch.cat(labels)
