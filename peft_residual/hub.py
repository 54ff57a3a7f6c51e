"""Saving and sharing ResiDual adapters: atomic saves, a model card of their own, one-commit pushes.

:mod:`.compat` routes ``PeftModel.save_pretrained``, ``create_or_update_model_card`` and ``push_to_hub`` here for
models whose adapters are all ResiDual; other PEFT methods keep PEFT's own behaviour.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from peft import PeftModel

from .tuner import ResiDualConfig, residual_tuner
from .tuner.config import SEMANTIC_FIELDS
from .tuner.errors import ResiDualInputError

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _residual_config(model: PeftModel, adapter_name: str | None) -> tuple[str, ResiDualConfig | None]:
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config.get(adapter_name)
    return adapter_name, config if isinstance(config, ResiDualConfig) else None


def model_card(model: PeftModel, adapter_name: str | None = None, training: dict[str, Any] | None = None) -> ModelCard:
    """The card of a ResiDual adapter: metadata, configuration, scale count, training data and results, usage."""
    adapter_name, config = _residual_config(model, adapter_name)
    if config is None:
        raise ResiDualInputError(f"Adapter {adapter_name!r} is not a ResiDual adapter.")
    base_model = config.base_model_name_or_path
    training = {**(config.training_summary or {}), **(training or {})}
    scales = sum(p.numel() for n, p in model.named_parameters() if n.endswith(f"residual_lambda.{adapter_name}"))
    tags = ["residual", "peft_residual", *([base_model] if base_model else [])]
    data = ModelCardData(library_name="peft", base_model=base_model, tags=tags, datasets=training.get("datasets"))
    settings = {key: value for key, value in config.to_dict().items() if key in SEMANTIC_FIELDS}
    signature = config.base_signature or {}
    lines = [
        f"# ResiDual adapter for {base_model or 'a vision transformer'}",
        "",
        "[ResiDual](https://arxiv.org/abs/2411.00246) rescales the principal components of each residual unit "
        "(attention heads, MLPs) of a frozen vision transformer to align its image embedding with a frozen "
        "classifier. This adapter holds only the trained scales and the per-unit PCA bases and means.",
        "",
        f"- Trainable scales: **{scales:,}**",
        f"- Base model: `{base_model}`",
        f"- Fitted at: {'x'.join(map(str, signature.get('image_size', []))) or 'unknown'} px images",
        "",
        "Loading needs `import peft_residual` first: it registers the method with PEFT.",
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
        "import peft_residual  # registers ResiDual with PEFT: loading needs this import (pip install peft-residual)",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f'base = AutoModel.from_pretrained("{base_model}")',
        'model = PeftModel.from_pretrained(base, "REPO_ID")',
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(model: PeftModel, output_dir: str | Path) -> None:
    """Write the ResiDual card of the active adapter as ``output_dir/README.md`` (what ``save_pretrained`` calls)."""
    model_card(model).save(Path(output_dir) / "README.md")


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return function(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def _link_missing(source: Path, target: Path) -> None:
    """Hard-link into ``target`` every file of ``source`` that ``target`` lacks (keeping the user's other files)."""
    for entry in source.iterdir():
        counterpart = target / entry.name
        if entry.is_dir() and not entry.is_symlink():
            counterpart.mkdir(exist_ok=True)
            _link_missing(entry, counterpart)
        elif not counterpart.exists():
            try:
                os.link(entry, counterpart, follow_symlinks=False)
            except OSError:  # another file system or no hard links: copy
                counterpart.write_bytes(entry.read_bytes())


def save_adapter_atomically(
    model: PeftModel, save_directory: str | Path, save: Callable[[str], None], selected: list[str] | None = None
) -> None:
    """Run ``save`` (PEFT's ``save_pretrained``) into a fresh directory beside ``save_directory``, then swap it in.

    A process killed at any moment leaves the old adapter or the new one at ``save_directory``, never a mix or a
    truncated file (on Linux; elsewhere the files are replaced one by one, the config last). Other files in
    ``save_directory`` are kept. An unfitted adapter is refused before anything is written.
    """
    tuner = residual_tuner(model)
    for adapter_name in selected or list(model.peft_config):
        tuner.readout.check_fitted(adapter_name)
    target = Path(save_directory)
    if target.is_file():
        raise ResiDualInputError(f"{target} is a file; save_pretrained needs a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving.", dir=target.parent))
    try:
        save(str(staging))
        if not target.exists():
            os.chmod(staging, 0o777 & ~_umask())
            os.rename(staging, target)
            return
        os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
        _link_missing(target, staging)
        if not _exchange(staging, target):
            logger.info("Atomic directory exchange unavailable here; replacing the adapter files one by one.")
            for path in sorted(staging.rglob("*"), key=lambda p: p.name == "adapter_config.json"):
                if path.is_file():
                    destination = target / path.relative_to(staging)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        raise ResiDualInputError(f"Adapter {adapter_name!r} is not a ResiDual adapter.")
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
