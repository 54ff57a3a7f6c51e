"""Loading a supported vision model from the Hub or a local directory."""

from __future__ import annotations

from torch import nn

from ..tuner.architectures import find_base_model


def load_vision_model(model_name_or_path: str, torch_dtype=None) -> nn.Module:
    """A supported model from a Hub id or local directory, in eval mode: CLIP as ``CLIPModel`` and BLIP as
    ``BlipForImageTextRetrieval`` (both towers, so the text side can build a zero-shot head), anything else through
    ``AutoModel``."""
    from transformers import AutoConfig, AutoModel, BlipForImageTextRetrieval, CLIPModel

    config = AutoConfig.from_pretrained(model_name_or_path)
    model_class = {"clip": CLIPModel, "blip": BlipForImageTextRetrieval}.get(config.model_type, AutoModel)
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    model = model_class.from_pretrained(model_name_or_path, **kwargs).eval()
    find_base_model(model)  # fails early, naming the supported models
    return model
