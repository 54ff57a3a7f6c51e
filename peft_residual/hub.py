"""Sharing ResiDual adapters on the Hugging Face Hub with a model card of their own.

``PeftModel.push_to_hub`` (from transformers' ``PushToHubMixin``) saves the adapter and then overwrites the
README with a generic transformers card. For a model whose active adapter is ResiDual, importing ``peft_residual``
routes ``push_to_hub`` to :func:`push_adapter_to_hub`, which uploads exactly ``adapter_config.json``,
``adapter_model.safetensors`` and the card below in one commit. Other PEFT methods keep PEFT's own behaviour.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from peft import PeftModel

from .config import ResiDualConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _residual_config(model: PeftModel, adapter_name: str | None) -> tuple[str, ResiDualConfig | None]:
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config.get(adapter_name)
    return adapter_name, config if isinstance(config, ResiDualConfig) else None


def model_card(model: PeftModel, adapter_name: str | None = None, training: dict[str, Any] | None = None) -> ModelCard:
    """The card of a ResiDual adapter: metadata, configuration, scale count, training data and results, usage."""
    adapter_name, config = _residual_config(model, adapter_name)
    if config is None:
        raise ValueError(f"Adapter {adapter_name!r} is not a ResiDual adapter.")
    base_model = config.base_model_name_or_path
    training = {**getattr(model.base_model, "training_summary", {}).get(adapter_name, {}), **(training or {})}
    scales = sum(p.numel() for n, p in model.named_parameters() if n.endswith(f"residual_lambda.{adapter_name}"))
    tags = ["residual", "peft_residual", *([base_model] if base_model else [])]
    data = ModelCardData(library_name="peft", base_model=base_model, tags=tags, datasets=training.get("datasets"))
    settings = {
        key: value
        for key, value in config.to_dict().items()
        if key in ("k", "units", "layers", "rest", "remainder", "lambda_init", "scale_per", "seed")
    }
    lines = [
        f"# ResiDual adapter for {base_model or 'a vision transformer'}",
        "",
        "[ResiDual](https://arxiv.org/abs/2411.00246) rescales the principal components of each residual unit "
        "(attention heads, MLPs) of a frozen vision transformer to align its image embedding with a frozen "
        "classifier. This adapter holds only the trained scales and the per-unit PCA bases and means.",
        "",
        f"- Trainable scales: **{scales:,}**",
        f"- Base model: `{base_model}`",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(settings, indent=1),
        "```",
        "",
        "## Training",
        "",
    ]
    if training:
        lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in training.items()]
    else:
        lines.append("Not recorded.")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import peft_residual  # registers ResiDual with PEFT; import it before loading",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f'base = AutoModel.from_pretrained("{base_model}")',
        'model = PeftModel.from_pretrained(base, "REPO_ID")',
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def push_adapter_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    adapter_name: str | None = None,
    training: dict[str, Any] | None = None,
) -> str:
    """Upload a ResiDual adapter (config, safetensors, model card) to ``repo_id`` in one commit; returns its URL.

    Everything is staged in a temporary directory, so a failed upload leaves no local trace.

    Example:
        >>> push_adapter_to_hub(model, "me/clip-residual-cifar10", training={"dataset": "cifar10"})
    """
    adapter_name, config = _residual_config(model, adapter_name)
    if config is None:
        raise ValueError(f"Adapter {adapter_name!r} is not a ResiDual adapter.")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging, selected_adapters=[adapter_name])
        folder = Path(staging) if adapter_name == "default" else Path(staging) / adapter_name
        card = model_card(model, adapter_name, training)
        card.text = card.text.replace("REPO_ID", repo_id)
        card.save(folder / "README.md")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=[*ADAPTER_FILES, "README.md"],
            commit_message=commit_message or "Upload ResiDual adapter",
            revision=revision,
        )
    return str(commit)


def install_push_to_hub() -> None:
    """Route ``PeftModel.push_to_hub`` to :func:`push_adapter_to_hub` for ResiDual adapters (idempotent)."""
    original = PeftModel.push_to_hub
    if getattr(original, "_residual_wrapped", False):
        return

    @functools.wraps(original)
    def push_to_hub(self: PeftModel, repo_id: str, *args: Any, **kwargs: Any) -> str:
        if args or _residual_config(self, None)[1] is None:
            return original(self, repo_id, *args, **kwargs)
        known = ("private", "token", "commit_message", "revision", "training")
        unsupported = sorted(set(kwargs) - set(known))
        if unsupported:
            raise TypeError(f"push_to_hub for ResiDual adapters takes {known}; got {unsupported}.")
        return push_adapter_to_hub(self, repo_id, **kwargs)

    push_to_hub._residual_wrapped = True
    PeftModel.push_to_hub = push_to_hub
