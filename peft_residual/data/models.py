"""Loading a supported vision model from the Hub or a local directory."""

from __future__ import annotations

from torch import nn

from ..tuner.architectures import find_base_model


def load_vision_model(model_name_or_path: str, torch_dtype=None) -> nn.Module:
    """A supported model from a Hub id or local directory, in eval mode: CLIP as ``CLIPModel`` (both towers, so the
    text tower can build a zero-shot head), anything else through ``AutoModel``."""
    from transformers import AutoConfig, AutoModel, CLIPModel

    config = AutoConfig.from_pretrained(model_name_or_path)
    model_class = CLIPModel if config.model_type == "clip" else AutoModel
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    model = model_class.from_pretrained(model_name_or_path, **kwargs).eval()
    find_base_model(model)  # fails early, naming the supported models
    return model
