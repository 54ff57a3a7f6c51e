"""An :class:`ArchitectureSpec` bound to a model (:class:`Architecture`): its sizes, unit names, the modules and
weights the decomposition reads, how to run its pieces, its signature and weights fingerprint; and the input rule
for ``pixel_values``. The spec comes from the registry (:mod:`.registry`), filled by the family files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import ResiDualInputError, warn_caller
from ..unit_names import unit_name
from .registry import find_base_model, spec_of
from .spec import ArchitectureSpec, Sizes, base_module

PIXEL_LIMIT = 20.0
"""Largest magnitude accepted in ``pixel_values``: an image processor's output (rescaled to [0, 1], then
normalised per channel) stays within a few units, raw 0-255 values do not."""


def unnormalised_message(where: str) -> str:
    return (
        f"{where}: pixel_values exceed ±{PIXEL_LIMIT:g}, so they look like raw 0-255 pixels. Run the images through "
        "the model's image processor (AutoImageProcessor / peft_residual.data.prepare), which rescales and "
        "normalises them."
    )


def check_normalised(pixel_values: torch.Tensor, where: str, in_forward: bool = False) -> None:
    """The rule for ``pixel_values`` at fit and at forward: floating point, and within ±:data:`PIXEL_LIMIT`. In a
    forward the range is checked with ``torch._assert_async``, no Python branch on the data (the forward stays
    exportable; it raises a ``RuntimeError`` at once in eager mode on the CPU, later on a GPU)."""
    if not pixel_values.is_floating_point():
        raise ResiDualInputError(
            f"{where}: pixel_values are {pixel_values.dtype}, raw image bytes. Run the images through the model's "
            "image processor (AutoImageProcessor / peft_residual.data.prepare), which rescales and normalises them."
        )
    if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:  # shapes only: no branch on the data
        raise ResiDualInputError(
            f"{where}: pixel_values must be a batch [images, channels, height, width] of at least one image, got "
            f"shape {tuple(pixel_values.shape)}; add a batch dimension to a single image (x[None]) and skip empty "
            "batches."
        )
    # max |x| as one reduction (one kernel on a GPU, where abs then amax take two); on a CPU torch 2.14's inf-norm
    # kernel takes 12-19x as long as those two, yet 77 µs for one 98-px image and 2.4 ms for 32: 0.2-0.3 % of a forward
    within = torch.linalg.vector_norm(pixel_values.detach(), float("inf")) <= PIXEL_LIMIT
    if in_forward:
        torch._assert_async(within, unnormalised_message(where))
    elif not bool(within):
        raise ResiDualInputError(unnormalised_message(where))


def multihead_attention_heads(
    attention: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> torch.Tensor:
    """The concatenated head outputs ``[batch, queries, dim]`` that ``attention`` (batch-first, packed ``in_proj``)
    feeds its ``out_proj``, computed as its own forward computes them; takes ``nn.MultiheadAttention``'s arguments.

    Example:
        >>> heads = multihead_attention_heads(block.attn, x, x, x, need_weights=False)
        >>> torch.allclose(block.attn.out_proj(heads), block.attn(x, x, x, need_weights=False)[0], atol=1e-6)
        True
    """
    if need_weights or key_padding_mask is not None or is_causal:
        raise ResiDualInputError(
            "An adapted nn.MultiheadAttention runs with need_weights=False and no key_padding_mask or is_causal "
            "(as open_clip's vision blocks call it); call it that way, or on the base model."
        )
    heads = attention.num_heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    if query is key and key is value:  # self-attention: one matrix product, as the module's own fast path
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:  # e.g. the query of the CLS token alone (a recording pass's last block)
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weight.chunk(3), biases, strict=True))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = attn_mask.logical_not()  # nn.MultiheadAttention masks True; scaled_dot_product_attention keeps it
    out = F.scaled_dot_product_attention(
        *(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)),
        attn_mask=attn_mask,
        dropout_p=attention.dropout if attention.training else 0.0,
    )
    return out.transpose(1, 2).flatten(2)


def _config_sizes(model: nn.Module, spec: ArchitectureSpec) -> Sizes:
    """The sizes of a transformers model, from its (vision) config."""
    config = getattr(model.config, spec.vision_config) if spec.vision_config else model.config
    heads = config.num_attention_heads
    return Sizes(config.num_hidden_layers, heads, config.hidden_size, config.hidden_size // heads, config.patch_size)


class MatrixProjection:
    """A projection kept as a bare ``[in, out]`` parameter and applied as ``pooled @ P`` (open_clip's ``proj``),
    seen as the linear layer it is: ``weight`` is ``P.T``, read live (it follows moves and casts)."""

    bias = None

    def __init__(self, owner: nn.Module, name: str) -> None:
        self.owner, self.name = owner, name

    @property
    def matrix(self) -> nn.Parameter:
        return getattr(self.owner, self.name)

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix.T

    @property
    def out_features(self) -> int:
        return self.matrix.shape[1]

    def parameters(self, recurse: bool = False) -> Iterator[nn.Parameter]:
        yield self.matrix


class Architecture:
    """An :class:`ArchitectureSpec` bound to a model: sizes, unit names and module lookup.

    Example:
        >>> arch = Architecture(model)
        >>> arch.unit_names[:3]
        ['embedding', 'layer0.head0', 'layer0.head1']
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = find_base_model(model)
        self.spec: ArchitectureSpec = spec_of(self.model)
        sizes = self.spec.sizes(self.model) if self.spec.sizes else _config_sizes(self.model, self.spec)
        self.num_layers, self.num_heads, self.hidden_size, self.head_dim, self.patch_size = sizes
        self.prefix_tokens = int(getattr(self.tower, "num_prefix_tokens", 1))
        """Tokens before the patches: the class token, and timm's register tokens."""
        projection = self.projection
        self.output_dim: int = projection.out_features if projection is not None else self.hidden_size
        # looked up now, not on first use: a forward with gradients on reads them, and a first lookup through
        # functools.cached_property takes a lock that torch.compile(fullgraph=True) cannot trace (Python 3.11)
        modules = [out_proj for out_proj, _, _ in self._head_modules] + [self.final_norm]
        modules += [projection] if projection is not None else []
        self._readout_parameters = [p for module in modules for p in module.parameters(recurse=False)]

    def module(self, path: str, layer: int | None = None) -> nn.Module:
        """The module at ``path`` (with ``{i}`` = ``layer``), looking through any PEFT wrapper."""
        return base_module(self.model.get_submodule(path.format(i=layer)))

    @property
    def tower(self) -> nn.Module:
        """The module that runs the vision backbone (the vision tower of a two-tower model)."""
        return self.model.get_submodule(self.spec.tower) if self.spec.tower else self.model

    def run_tower(self, pixel_values: torch.Tensor) -> Any:
        """Run the vision backbone on ``pixel_values``, as its library calls it."""
        return self.tower(pixel_values=pixel_values) if self.spec.keyword_input else self.tower(pixel_values)

    def run_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Run one layer's attention output module: what it returns, the concatenated heads entering its output
        projection and that projection's output. ``nn.MultiheadAttention`` runs in steps that expose its heads."""
        if not self.spec.multihead_attention:
            output = module(*args, **kwargs)
            return output, args[0], output
        heads = multihead_attention_heads(module, *args, **kwargs)
        projected = module.out_proj(heads)
        return (projected, None), heads, projected

    def attention_pieces(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads and the projection's output of an attention output module that already ran (a hook on a bare
        model): ``nn.MultiheadAttention`` keeps its heads to itself, so they are computed again from its inputs."""
        if not self.spec.multihead_attention:
            return args[0], output
        return multihead_attention_heads(module, *args, **kwargs), output[0]

    @cached_property
    def final_norm(self) -> nn.LayerNorm:
        """The final norm (the base module, looked up once: every adapted forward reads it)."""
        return self.module(self.spec.final_norm)

    @cached_property
    def projection(self) -> nn.Linear | MatrixProjection | None:
        """The projection after the final norm, if any (the base module, looked up once)."""
        if self.spec.projection is None:
            return None
        if self.spec.projection_matrix:
            owner, name = self.spec.projection.rpartition(".")[::2]
            return MatrixProjection(self.model.get_submodule(owner), name)
        return self.module(self.spec.projection)

    @property
    def readout_path(self) -> str:
        """The module ResiDual wraps to read out: the projection if it is a module, else the final norm (with a
        projection matrix the tower's output is replaced, see :attr:`ArchitectureSpec.projection_matrix`)."""
        if self.spec.projection and not self.spec.projection_matrix:
            return self.spec.projection
        return self.spec.final_norm

    def attention_layer_scale(self, layer: int) -> torch.Tensor | None:
        _, owner, name = self._head_modules[layer]
        return getattr(owner, name) if owner is not None else None

    @cached_property
    def _head_modules(self) -> list[tuple[nn.Linear, nn.Module | None, str]]:
        """Per layer, the attention output projection and the module and name of any layer scale (looked up once:
        a forward reads them every call)."""
        found = []
        for layer in range(self.num_layers):
            path = self.spec.attention_layer_scale
            owner, name = path.format(i=layer).rsplit(".", 1) if path else (None, "")
            attention_out = self.module(self.spec.attention_out, layer)
            if self.spec.multihead_attention:
                attention_out = attention_out.out_proj
            found.append((attention_out, self.model.get_submodule(owner) if owner else None, name))
        return found

    def head_map(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Each head of ``layer`` adds ``(W_h z + b / heads) * scale`` to the residual stream, ``z`` its output:
        ``W`` ``[hidden, heads, head_dim]`` and ``b / heads`` in ``dtype``, and the layer scale (each ``None`` if
        the model has none). The one owner of that map: :meth:`head_contributions` applies it to a batch, and
        ``peft_residual.tuner.head_space`` spans its image."""
        out_proj = self._head_modules[layer][0]
        weight = out_proj.weight.to(dtype).view(self.hidden_size, self.num_heads, self.head_dim)
        bias = out_proj.bias.to(dtype) / self.num_heads if out_proj.bias is not None else None
        return weight, bias, self.attention_layer_scale(layer)

    def head_contributions(self, layer: int, head_inputs: torch.Tensor) -> torch.Tensor:
        """What each head of ``layer`` adds to the residual stream, ``[batch, heads, hidden]``, from the
        concatenated head outputs ``[batch, hidden]`` entering the output projection (in their dtype)."""
        dtype, heads, head_dim = head_inputs.dtype, self.num_heads, self.head_dim
        weight, bias, scale = self.head_map(layer, dtype)
        per_head = torch.bmm(head_inputs.view(-1, heads, head_dim).transpose(0, 1), weight.permute(1, 2, 0))
        per_head = per_head.transpose(0, 1) if bias is None else per_head.transpose(0, 1) + bias
        return per_head * scale.to(dtype) if scale is not None else per_head

    def readout_weights_require_grad(self) -> bool:
        """Whether any weight the readout plans are built from (output projections, layer scales, final norm,
        projection) is trainable."""
        scales = [self.attention_layer_scale(layer) for layer in range(self.num_layers)]
        return any(p.requires_grad for p in self._readout_parameters) or any(
            s is not None and s.requires_grad for s in scales
        )

    @cached_property
    def bias_shares(self) -> torch.Tensor:
        """Each unit's share of a constant added after the residual stream: ``1/(2L+1)`` per block, split among
        heads (float64)."""
        blocks = 2 * self.num_layers + 1
        shares = torch.full((self.num_units,), 1.0 / blocks, dtype=torch.float64)
        for layer in range(self.num_layers):
            shares[self.heads_slice(layer)] = 1.0 / (blocks * self.num_heads)
        return shares

    @cached_property
    def unit_names(self) -> list[str]:
        """Names of the units, in the order of :meth:`unit_slices`: embedding, then per layer its heads and MLP."""
        names = ["embedding"]
        for layer in range(self.num_layers):
            names += [unit_name(layer, head) for head in range(self.num_heads)] + [unit_name(layer)]
        return names

    @property
    def num_units(self) -> int:
        return 1 + self.num_layers * (self.num_heads + 1)

    def unit_modules(self) -> Iterator[tuple[str, str, int | None]]:
        """``(path, kind, layer)`` of every module that produces units, in unit order."""
        yield self.spec.embedding, "embedding", None
        for layer in range(self.num_layers):
            yield self.spec.attention_out.format(i=layer), "heads", layer
            yield self.spec.mlp_out.format(i=layer), "mlps", layer

    def heads_slice(self, layer: int) -> slice:
        start = 1 + layer * (self.num_heads + 1)
        return slice(start, start + self.num_heads)

    def mlp_slice(self, layer: int) -> slice:
        start = 1 + layer * (self.num_heads + 1) + self.num_heads
        return slice(start, start + 1)

    def max_rank(self, kind: str, ln_mean: str = "shared", centre: bool = True) -> int:
        """Upper bound on the rank of a unit's (centred) contributions over any data set.

        A head's contribution is an affine image of a ``head_dim`` vector rescaled per sample by the final norm,
        so it spans at most ``head_dim + 1`` directions, one more with the shared mean of the norm (``ln_mean``)
        and one more uncentred (see :mod:`peft_residual.tuner.head_space`); other units may span the whole output space.
        """
        if kind != "heads":
            return self.output_dim
        return min(self.head_dim + 1 + (ln_mean == "shared") + (not centre), self.output_dim)

    def check_pixel_values(self, pixel_values: object, where: str) -> torch.Tensor:
        """``pixel_values`` if it is a finite ``[batch, channels, height, width]`` tensor whose sides are multiples
        of the patch size; otherwise an error naming ``where`` it came from."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ResiDualInputError(
                f"{where}: pixel_values must be a [batch, channels, height, width] tensor, got {shape}."
            )
        if len(pixel_values) == 0:
            raise ResiDualInputError(f"{where}: the batch is empty.")
        height, width = pixel_values.shape[-2:]
        patch = self.patch_size
        if height % patch or width % patch or height < patch:
            raise ResiDualInputError(
                f"{where}: images of {height}x{width} px do not split into {patch}x{patch} patches; resize them to a "
                f"multiple of {patch} (e.g. {max(patch, round(height / patch) * patch)})."
            )
        if pixel_values.is_floating_point() and not torch.isfinite(pixel_values).all():
            raise ResiDualInputError(
                f"{where}: pixel_values hold NaN or infinite values; check the image preprocessing."
            )
        check_normalised(pixel_values, where)
        return pixel_values

    def structure(self) -> dict[str, Any]:
        """The sizes that fix the units' shapes, and the vision tower's class: the model class around it (e.g.
        ``CLIPVisionModelWithProjection`` or ``CLIPModel``) is recorded but not compared, since the adapter's
        parameter paths and the weights fingerprint (tower and projection) are the same in both."""
        return {
            "model_type": type(self.model).__name__,
            "tower_type": type(self.tower).__name__,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "output_dim": self.output_dim,
            "patch_size": self.patch_size,
        }

    def signature(self, image_size: tuple[int, int]) -> dict[str, Any]:
        """What bases fitted on this model at ``image_size`` depend on: see ``ResiDualConfig.base_signature``."""
        height, width = image_size
        return {
            **self.structure(),
            "image_size": [int(height), int(width)],
            "num_tokens": self.prefix_tokens + (height // self.patch_size) * (width // self.patch_size),
            "weights_fingerprint": self.weights_fingerprint(),
        }

    def check_signature(self, signature: dict[str, Any]) -> None:
        """Refuse bases fitted on another base model: other sizes, or other weights."""
        current = {key: value for key, value in self.structure().items() if key != "model_type"}
        differ = [
            f"{key} {signature.get(key)!r} vs {value!r}"
            for key, value in current.items()
            if key in signature and signature[key] != value  # older adapters lack tower_type
        ]
        saved_weights = signature.get("weights_fingerprint")
        if not differ and saved_weights is not None and not same_weights(saved_weights, self.weights_fingerprint()):
            differ.append("the base weights (fingerprint) differ")
        if differ:
            raise ResiDualInputError(
                f"This ResiDual adapter was fitted on another base model ({'; '.join(differ)}, saved vs this "
                "model). Load it onto the base model it was fitted on, or fit new bases on this one."
            )

    def check_image_size(
        self,
        adapter_name: str,
        signature: dict[str, Any] | None,
        image_size: tuple[int, int] | None = None,
        num_tokens: int | None = None,
    ) -> None:
        """Warn where an input differs from the images an adapter's bases were fitted on (its ``signature``):
        ``num_tokens`` other than the fitted (checked by the readout, in every pass), or an ``image_size`` of other
        pixels with the same patch grid, which a model that crops to whole patches (transformers' DINOv2) runs
        without a word (checked per call)."""
        fitted_tokens, fitted_size = (signature or {}).get("num_tokens"), (signature or {}).get("image_size")
        if num_tokens is not None and fitted_tokens not in (None, num_tokens):
            warn_caller(  # Python shows each distinct message once per calling line
                f"ResiDual adapter '{adapter_name}' was fitted on images of {fitted_tokens} tokens, but this input "
                f"gives {num_tokens}: the PCA bases do not describe units at another image size, so the output is "
                "unreliable. Resize the images to the size in adapter_config.json (base_signature.image_size)."
            )
        patch = self.patch_size
        if image_size is None or fitted_size in (None, list(image_size)):
            return
        grid = [side // patch for side in image_size]
        if grid == [side // patch for side in fitted_size]:
            warn_caller(
                f"ResiDual adapter '{adapter_name}' was fitted on {fitted_size[0]}x{fitted_size[1]} px images, but "
                f"this input is {image_size[0]}x{image_size[1]} px: the same {grid[0]}x{grid[1]} patches of {patch} "
                f"px, from pixels the bases were not fitted on. Resize the images to "
                f"{fitted_size[0]}x{fitted_size[1]} px."
            )

    def check_outermost(self, model: nn.Module) -> None:
        """Refuse a model class that is not registered itself but holds a supported one (e.g. a head around a ViT): what
        its head reads is unknown, so ResiDual cannot say it adapts it."""
        if self.model is model:
            return
        path = next(name for name, module in model.named_modules() if module is self.model)
        outer, inner = type(model).__name__, type(self.model).__name__
        raise ResiDualInputError(
            f"ResiDual does not support {outer}: it holds a {inner} at {path!r}, but nothing says what its head reads, "
            f"so ResiDual cannot adapt it (ResiDual adapts exactly the embedding a registered model's head reads; "
            f"supported classifiers: ViTForImageClassification, Dinov2ForImageClassification). Pass the inner model "
            f"(model.{path}) to get_peft_model and train a head on its adapted embedding (train_residual(..., "
            f"head='linear')), or register {outer} with @peft_residual.models.register_model, its spec naming the "
            "classifier and what it reads."
        )

    def weights_fingerprint(self, samples_per_tensor: int = 1024, projections: int = 7) -> list[float]:
        """A short, dtype-tolerant fingerprint of the vision weights: the norm of a strided sample of every
        parameter, then ``projections`` fixed random ±1 projections of that sample divided by its norm.

        Each projection is a standard normal for unrelated weights, but moves by ~1e-3 at most when the same weights
        are cast to half precision, so :func:`same_weights` can compare with a tolerance instead of a hash."""
        parameters = base_parameters(self.tower)
        if self.projection is not None and not self.spec.projection_matrix:  # a matrix lies in the tower
            parameters += base_parameters(self.projection)
        pieces = []
        for param in parameters:
            flat = param.detach().reshape(-1)
            step = max(1, len(flat) // samples_per_tensor)
            pieces.append(flat[::step][:samples_per_tensor].double().cpu())
        sample = torch.cat(pieces)
        norm = float(sample.norm())
        signs = torch.randint(0, 2, (projections, len(sample)), generator=torch.Generator().manual_seed(0)) * 2 - 1
        projected = (signs.double() @ sample) / max(norm, 1e-30)
        return [round(norm, 6), *(round(float(v), 6) for v in projected)]


def architecture_of(model: nn.Module) -> Architecture:
    """The :class:`Architecture` of ``model``: the one a ResiDual tuner built once at injection (``model`` is the
    ``PeftModel`` or the tuner), else a new one."""
    arch = getattr(getattr(model, "base_model", model), "arch", None)
    return arch if isinstance(arch, Architecture) else Architecture(model)


def base_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that belong to the base model, not to any PEFT adapter inside it."""
    adapter = set()
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            base = {id(p) for p in layer.get_base_layer().parameters()}
            adapter |= {id(p) for p in layer.parameters() if id(p) not in base}
    return [p for p in module.parameters() if id(p) not in adapter]


def same_weights(saved: list[float], current: list[float], tolerance: float = 1e-2) -> bool:
    """Whether two :meth:`Architecture.weights_fingerprint` values describe the same weights (up to a dtype cast)."""
    if len(saved) != len(current):
        return False
    norm_close = math.isclose(saved[0], current[0], rel_tol=tolerance)
    return norm_close and all(abs(a - b) <= tolerance for a, b in zip(saved[1:], current[1:], strict=True))
