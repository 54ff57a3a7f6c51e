"""Inference helpers: the image embedding a model gives, over one batch or a whole loader, and top-1 accuracy."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from .compat import is_residual_model
from .errors import ResiDualInputError
from .models import architecture_of
from .recording import labels_of, pixel_values_of
from .records import BASE


def embed_images(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's image embedding: ``image_embeds`` with a projection, else ``pooler_output`` (the normed CLS
    token for ViT, whose pooler is a further tanh layer); for an image classifier (``ViTForImageClassification``,
    ``Dinov2ForImageClassification``) its tower's, the CLS embedding its head reads; for open_clip
    ``encode_image`` (unnormalised), for timm the model's output.

    For a ``PeftModel`` with an active ResiDual adapter this is the adapted embedding.

    Example:
        >>> embed_images(peft_model, pixel_values).shape
        torch.Size([8, 512])
    """
    arch = architecture_of(model)
    if not arch.spec.keyword_input:  # open_clip's vision tower, a timm model: their output is the embedding
        return arch.run_tower(pixel_values)
    if arch.spec.vision_config and hasattr(model, "get_image_features"):  # two-tower model: only the image side runs
        return model.get_image_features(pixel_values=pixel_values).pooler_output
    if arch.spec.vision_config:  # BLIP retrieval: its contrastive head, the tower's normed CLS through vision_proj
        cls_token = arch.tower(pixel_values=pixel_values).last_hidden_state[:, 0]
        return arch.model.get_submodule(arch.spec.projection)(cls_token)
    if arch.spec.classifier:  # an image classifier's output is logits: the embedding is its tower's
        output = arch.tower(pixel_values=pixel_values)
        return output.last_hidden_state[:, 0] if arch.spec.pooled == "cls" else output.pooler_output
    output = model(pixel_values=pixel_values)
    embeds = getattr(output, "image_embeds", None)
    if embeds is not None:
        return embeds
    return output.last_hidden_state[:, 0] if arch.spec.pooled == "cls" else output.pooler_output


def embed_all_adapters(
    model: nn.Module, pixel_values: torch.Tensor, adapter_names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every adapter's image embedding (``adapter_names``: those, else every fitted one) from one backbone pass.

    The backbone does not change between ResiDual adapters, so N tasks cost one forward and N readouts; each
    embedding equals what :func:`embed_images` gives with that adapter active, exactly.

    Example:
        >>> embeddings = embed_all_adapters(peft_model, pixel_values)  # {"mnist": [B, dim], "svhn": [B, dim]}
    """
    if not is_residual_model(model):
        raise ResiDualInputError("embed_all_adapters needs a PeftModel with ResiDual adapters.")
    tuner = model.base_model
    names = list(adapter_names) if adapter_names is not None else tuner.readout.fitted_adapters()
    with tuner.each_adapter(names):
        embeddings = embed_images(model, pixel_values)
    return dict(zip(names, embeddings.split(len(pixel_values)), strict=True))


def check_labels(labels: torch.Tensor, num_classes: int | None, where: str) -> torch.Tensor:
    """``labels`` if they are class indices below ``num_classes``; otherwise an error naming ``where``."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ResiDualInputError(f"{where}: labels must be integer class indices, got {labels.dtype}.")
    if num_classes is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ResiDualInputError(
            f"{where}: label {int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())} is "
            f"outside the classifier's {num_classes} classes (0..{num_classes - 1}); use the classifier built for "
            "this data set's classes."
        )
    return labels


@torch.no_grad()
def embed_batches(
    model: nn.Module,
    batches: Iterable[dict],
    label_column: str = "label",
    base: bool = False,
    progress: bool = True,
    num_classes: int | None = None,
    desc: str = "Embedding images",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings (float32, on CPU) and labels of every batch; ``base=True`` gives the base model's.

    Labels at or above ``num_classes`` are an error.

    Example:
        >>> features, labels = embed_batches(peft_model, DataLoader(test, batch_size=64))
        >>> accuracy(classifier(features), labels)
    """
    if base and is_residual_model(model):  # read out as "__base__" pass by pass: no module state changes
        features, labels = embed_batches_of_adapters(model, batches, [BASE], label_column, progress, num_classes, desc)
        return features[BASE], labels
    embed = lambda x: {"": embed_images(model, x)}  # noqa: E731
    with model.disable_adapter() if base and hasattr(model, "disable_adapter") else nullcontext():
        features, labels = _embedded(model, batches, embed, label_column, progress, num_classes, desc)
    return features[""], labels


@torch.no_grad()
def embed_batches_of_adapters(
    model: nn.Module,
    batches: Iterable[dict],
    adapter_names: list[str] | None = None,
    label_column: str = "label",
    progress: bool = True,
    num_classes: int | None = None,
    desc: str = "Embedding images",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`embed_batches` for several adapters from one backbone pass per batch (see :func:`embed_all_adapters`;
    ``"__base__"`` names the base model): each adapter's embeddings, and the labels.

    Example:
        >>> features, labels = embed_batches_of_adapters(peft_model, test_loader, ["__base__", "default"])
        >>> accuracy(classifier(features["__base__"]), labels), accuracy(classifier(features["default"]), labels)
    """
    embed = lambda x: embed_all_adapters(model, x, adapter_names)  # noqa: E731
    return _embedded(model, batches, embed, label_column, progress, num_classes, desc)


def _embedded(
    model: nn.Module,
    batches: Iterable[dict],
    embed: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    label_column: str,
    progress: bool,
    num_classes: int | None,
    desc: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every batch's checked pixels through ``embed`` (named embeddings), gathered float32 on the CPU, with the
    checked labels."""
    arch = architecture_of(model)
    reference = next(model.parameters())
    features, labels = defaultdict(list), []
    total = len(batches) if hasattr(batches, "__len__") else None
    for step, batch in enumerate(tqdm(batches, desc=desc, total=total, disable=not progress)):
        pixel_values = arch.check_pixel_values(pixel_values_of(batch), f"{desc} batch {step}")
        for name, embedding in embed(pixel_values.to(reference.device, reference.dtype)).items():
            features[name].append(embedding.float().cpu())
        found = labels_of(batch, label_column)
        if found is None:
            raise ResiDualInputError(
                f"{desc} batch {step} has no labels (no {label_column!r}); give batches with labels, or name their "
                "key with label_column."
            )
        labels.append(check_labels(found, num_classes, f"{desc} batch {step}"))
    if not labels:
        raise ResiDualInputError(f"{desc}: no batches; the data set is empty.")
    return {name: torch.cat(parts) for name, parts in features.items()}, torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy, computed here: ``evaluate.load("accuracy")`` fetches its metric script from the Hub and
    fails offline. NaN for no samples."""
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else math.nan
