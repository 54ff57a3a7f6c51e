"""Where a vision transformer keeps its residual units.

Each supported model class gets one :class:`ArchitectureSpec` naming, as dotted module paths (``{i}`` stands for the
layer index), the module whose output is the embedding unit, the attention output projection whose input holds the
concatenated heads, the module whose output is a layer's full MLP contribution, the final norm and the optional
projection. Supporting a new pre-LN ViT is one more entry in :data:`ARCHITECTURES`; :data:`REFUSED` names the
models that cannot be decomposed, and why. Models of other libraries (open_clip, timm) get their spec from a function
of the model, which reads its variant or refuses it (:mod:`.libraries`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .errors import ResiDualInputError
from .libraries import base_module, multihead_attention_heads, open_clip_spec, timm_spec
from .spec import ArchitectureSpec, Sizes

_CLIP_TOWER = ArchitectureSpec(
    vision_config=None,
    embedding="pre_layrnorm",
    attention_out="encoder.layers.{i}.self_attn.out_proj",
    mlp_out="encoder.layers.{i}.mlp",
    final_norm="post_layernorm",
)


_BLIP_TOWER = ArchitectureSpec(
    vision_config=None,
    embedding="embeddings",
    attention_out="encoder.layers.{i}.self_attn.projection",  # q, k and v come from one packed qkv linear
    mlp_out="encoder.layers.{i}.mlp",
    final_norm="post_layernorm",
    pooled="cls",
)


def _under(prefix: str, spec: ArchitectureSpec, **changes: str | None) -> ArchitectureSpec:
    names = ("embedding", "attention_out", "mlp_out", "mlp", "final_norm")
    paths = {name: f"{prefix}.{getattr(spec, name)}" for name in names if getattr(spec, name) is not None}
    return ArchitectureSpec(**{**spec.__dict__, **paths, **changes})


ARCHITECTURES: dict[str, ArchitectureSpec | Callable[[nn.Module], ArchitectureSpec]] = {
    "CLIPVisionModel": _CLIP_TOWER,
    "CLIPVisionModelWithProjection": _under(
        "vision_model", _CLIP_TOWER, projection="visual_projection", tower="vision_model"
    ),
    "CLIPModel": _under(
        "vision_model", _CLIP_TOWER, vision_config="vision_config", projection="visual_projection", tower="vision_model"
    ),
    "Dinov2Model": ArchitectureSpec(
        vision_config=None,
        embedding="embeddings",
        attention_out="encoder.layer.{i}.attention.o_proj",
        attention_layer_scale="encoder.layer.{i}.layer_scale1.lambda1",
        mlp_out="encoder.layer.{i}.layer_scale2",
        mlp="encoder.layer.{i}.mlp",
        final_norm="layernorm",
    ),
    # ViTModel's pooler_output is tanh(dense(CLS)), not linear in the units: the embedding is the normed CLS token,
    # which is also what ViTForImageClassification classifies.
    "ViTModel": ArchitectureSpec(
        vision_config=None,
        embedding="embeddings",
        attention_out="layers.{i}.attention.o_proj",
        mlp_out="layers.{i}.mlp",
        final_norm="layernorm",
        pooled="cls",
    ),
    # BLIP's vision model applies post_layernorm twice to the pooled output (pooler_output = LN(LN(CLS))); its
    # image-text contrastive head reads the once-normed CLS token, last_hidden_state[:, 0], which is what is
    # decomposed: alone, and through vision_proj in the retrieval model.
    "BlipVisionModel": _BLIP_TOWER,
    "BlipForImageTextRetrieval": _under(
        "vision_model", _BLIP_TOWER, vision_config="vision_config", projection="vision_proj", tower="vision_model"
    ),
    # other libraries: a spec built per model, which reads its variant (see .libraries)
    **dict.fromkeys(("open_clip.CLIP", "open_clip.CustomTextCLIP", "open_clip.VisionTransformer"), open_clip_spec),
    "timm.VisionTransformer": timm_spec,
}
"""Supported model classes, by :func:`model_key`: a spec, or a function giving a model's spec (or refusing it)."""

_SIGLIP = (
    "SigLIP has no CLS token: its pooled output comes from an attention-pooling head whose softmax weights depend on "
    "every token, so it is not a sum of residual units, and no single token's residual is either. ResiDual needs a "
    "pooled output that is a linear readout of one token (CLIP, DINOv2, ViT, BLIP)."
)
REFUSED: dict[str, str] = {
    **dict.fromkeys(("SiglipVisionModel", "SiglipModel", "Siglip2VisionModel", "Siglip2Model"), _SIGLIP),
    "BlipModel": "BlipModel's image features normalise the CLS token twice (post_layernorm, then again on the "
    "pooled token), which this decomposition does not linearise. Load the checkpoint as BlipForImageTextRetrieval "
    "(as load_vision_model does): its image-text contrastive head reads the once-normed CLS token through "
    "vision_proj, and BlipVisionModel's last_hidden_state[:, 0] is the same token.",
}
"""Model classes ResiDual cannot decompose, with the reason given to the user."""


def model_key(module: nn.Module) -> str:
    """How :data:`ARCHITECTURES` names a model class: a transformers class by its name, another library's as
    ``"library.ClassName"`` (open_clip and timm both have a ``VisionTransformer``)."""
    library = type(module).__module__.split(".")[0]
    return type(module).__name__ if library == "transformers" else f"{library}.{type(module).__name__}"


def find_base_model(model: nn.Module) -> nn.Module:
    """The supported model inside ``model``, which may be wrapped by a ``PeftModel`` and a ``BaseTuner``."""
    for candidate in model.modules():
        key = model_key(candidate)
        if key in ARCHITECTURES:
            return candidate
        if key in REFUSED:
            raise ResiDualInputError(f"ResiDual cannot adapt {type(candidate).__name__}. {REFUSED[key]}")
    raise ResiDualInputError(
        f"ResiDual does not support {type(model).__name__}. Supported model classes: "
        f"{', '.join(sorted(ARCHITECTURES))}. Add an ArchitectureSpec to "
        "peft_residual.tuner.architectures.ARCHITECTURES for another pre-LN vision transformer."
    )


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
    within = pixel_values.detach().abs().amax() <= PIXEL_LIMIT
    if in_forward:
        torch._assert_async(within, unnormalised_message(where))
    elif not bool(within):
        raise ResiDualInputError(unnormalised_message(where))


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
        spec = ARCHITECTURES[model_key(self.model)]
        self.spec: ArchitectureSpec = spec if isinstance(spec, ArchitectureSpec) else spec(self.model)
        sizes = self.spec.sizes(self.model) if self.spec.sizes else _config_sizes(self.model, self.spec)
        self.num_layers, self.num_heads, self.hidden_size, self.head_dim, self.patch_size = sizes
        self.prefix_tokens = int(getattr(self.tower, "num_prefix_tokens", 1))
        """Tokens before the patches: the class token, and timm's register tokens."""
        projection = self.projection
        self.output_dim: int = projection.out_features if projection is not None else self.hidden_size

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

    def out_projection(self, layer: int) -> nn.Linear:
        """The attention output projection of ``layer``: its input is the concatenated heads."""
        return self._head_modules[layer][0]

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

    def head_contributions(self, layer: int, head_inputs: torch.Tensor) -> torch.Tensor:
        """What each head of ``layer`` adds to the residual stream, ``[batch, heads, hidden]``, from the
        concatenated head outputs ``[batch, hidden]`` entering the output projection (in their dtype)."""
        out_proj = self._head_modules[layer][0]
        dtype, heads, head_dim = head_inputs.dtype, self.num_heads, self.head_dim
        weight = out_proj.weight.to(dtype).view(self.hidden_size, heads, head_dim).permute(1, 2, 0)
        per_head = torch.bmm(head_inputs.view(-1, heads, head_dim).transpose(0, 1), weight).transpose(0, 1)
        if out_proj.bias is not None:
            per_head = per_head + out_proj.bias.to(dtype) / heads
        scale = self.attention_layer_scale(layer)
        return per_head * scale.to(dtype) if scale is not None else per_head

    @property
    def attention_layer_scales(self) -> torch.Tensor | None:
        """Every layer's attention layer scale, ``[layers, hidden]``, or ``None`` if the model has none."""
        scales = [self.attention_layer_scale(layer) for layer in range(self.num_layers)]
        return torch.stack(scales) if scales[0] is not None else None

    @cached_property
    def _readout_parameters(self) -> list[torch.Tensor]:
        modules = [out_proj for out_proj, _, _ in self._head_modules] + [self.final_norm]
        modules += [self.projection] if self.projection is not None else []
        return [p for module in modules for p in module.parameters(recurse=False)]

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
            names += [f"layer{layer}.head{h}" for h in range(self.num_heads)] + [f"layer{layer}.mlp"]
        return names

    @property
    def num_units(self) -> int:
        return 1 + self.num_layers * (self.num_heads + 1)

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
        and one more uncentred (see :mod:`.head_space`); other units may span the whole output space.
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
