"""Saving and sharing ResiDual adapters: atomic saves, a model card of their own, one-commit pushes.

:mod:`.compat` routes ``PeftModel.save_pretrained``, ``create_or_update_model_card`` and ``push_to_hub`` here for
models whose adapters are all ResiDual; other PEFT methods keep PEFT's own behaviour. A save is staged inside the
target directory, and :data:`SAVE_IN_PROGRESS` marks the few moments in which the staged files move into place: a
process killed then leaves the marker, and :func:`check_saved_adapter` (run before ``ResiDualConfig.from_pretrained``
reads a local directory) refuses the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

from .errors import ResiDualInputError
from .tuner import ResiDualConfig, residual_tuner
from .tuner.config import SEMANTIC_FIELDS

ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
CLASSIFIER_DIR = "classifier"
"""Where an adapter's classifier lives beside it: in a directory ``peft-residual train`` writes, and in a Hub
repository an adapter was pushed to with its head."""

SAVE_IN_PROGRESS = ".residual-save-in-progress"
"""Present in an adapter directory only while a save replaces its files."""
STAGING_PREFIX = ".residual-staging."
"""Directories inside an adapter directory that hold a save being written; leftovers of a killed save."""


def check_saved_adapter(directory: str | Path) -> None:
    """Refuse a local adapter directory that a killed save left half replaced, that lacks its weights file, or
    whose weights hold NaN or infinity; a clear error names the directory or file and the fix.

    Example:
        >>> check_saved_adapter("out/adapter")  # before PeftModel.from_pretrained(base, "out/adapter")
    """
    directory = Path(directory)
    # a named adapter sits in a subfolder of the directory that was saved to, where the marker is
    if (directory / SAVE_IN_PROGRESS).exists() or (directory.parent / SAVE_IN_PROGRESS).exists():
        raise ResiDualInputError(
            f"{directory} holds an interrupted save: the process saving an adapter there was killed while it "
            "replaced the files, so they may come from two saves. Save the adapter there again."
        )
    weights = directory / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        raise ResiDualInputError(
            f"{directory} has an adapter config but no {SAFETENSORS_WEIGHTS_NAME}; copy the whole adapter "
            "directory, or save the adapter there again."
        )
    try:
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ResiDualInputError(
                        f"{weights} is damaged: tensor {key} holds NaN or infinity. Restore the file or save the "
                        "adapter again."
                    )
    except SafetensorError as error:  # truncated or overwritten: safetensors' own message names no file
        raise ResiDualInputError(
            f"{weights} is not a readable safetensors file ({error}); it was truncated or damaged in a copy. Restore "
            "the file or save the adapter again."
        ) from None


def _residual_config(model: PeftModel, adapter_name: str | None) -> tuple[str, ResiDualConfig | None]:
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config.get(adapter_name)
    return adapter_name, config if isinstance(config, ResiDualConfig) else None


def model_card(
    model: PeftModel, adapter_name: str | None = None, training: dict[str, Any] | None = None, classifier: Any = None
) -> ModelCard:
    """The card of a ResiDual adapter: metadata, configuration, scale count, training data and results, usage (with
    the ``classifier`` pushed beside it, if any)."""
    adapter_name, config = _residual_config(model, adapter_name)
    if config is None:
        raise ResiDualInputError(f"Adapter {adapter_name!r} is not a ResiDual adapter.")
    base_model = config.base_model_name_or_path
    training = {**(config.training_summary or {}), **(training or {})}
    scales = sum(scale.numel() for scale in residual_tuner(model).readout.scales(adapter_name))
    hub_id = _hub_model_id(base_model)  # the metadata links a Hub model; a local path is named in the text only
    tags = ["residual", "peft_residual", *([hub_id] if hub_id else [])]
    data = ModelCardData(library_name="peft", base_model=hub_id, tags=tags, datasets=training.get("datasets"))
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
    ]
    if classifier is not None:
        lines += [
            f"# its classifier ({classifier.head_name}), on the adapted embedding",
            f'head = peft_residual.Classifier.from_pretrained("REPO_ID", subfolder="{CLASSIFIER_DIR}")',
        ]
    lines.append("```")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{CARD_START}\n" + "\n".join(lines) + f"\n{CARD_END}\n")


def _hub_model_id(name: str | None) -> str | None:
    """``name`` where it can be a Hub model id, else ``None``: a model loaded from a local directory has its path as
    ``base_model_name_or_path``, and the Hub checks a card's metadata on upload (a local path there has failed
    pushes: transformers#33922)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


CARD_START, CARD_END = "<!-- ResiDual adapter: start -->", "<!-- ResiDual adapter: end -->"


def write_model_card(model: PeftModel, output_dir: str | Path) -> None:
    """Write the ResiDual card of the active adapter as ``output_dir/README.md`` (what ``save_pretrained`` calls).

    An existing card is updated the way PEFT updates one: its text and metadata stay, the ResiDual metadata is
    merged in (tags added, fields it lacks filled), and the ResiDual section is refreshed in place or appended."""
    path = Path(output_dir) / "README.md"
    ours = model_card(model)
    if not path.is_file():
        ours.save(path)
        return
    card = ModelCard.load(path)
    merged = card.data.to_dict()
    for key, value in ours.data.to_dict().items():
        if key == "tags":
            merged["tags"] = list(dict.fromkeys([*(merged.get("tags") or []), *value]))
        elif merged.get(key) is None:
            merged[key] = value
    section = ours.text.strip()
    start, end = card.text.find(CARD_START), card.text.find(CARD_END)
    if 0 <= start < end:
        text = card.text[:start] + section + card.text[end + len(CARD_END) :]
    else:
        text = card.text.rstrip() + "\n\n" + section + "\n"
    ModelCard(f"---\n{ModelCardData(**merged).to_yaml()}\n---\n\n{text.lstrip()}").save(path)


def save_adapter_atomically(
    model: PeftModel, save_directory: str | Path, save: Callable[[str], None], selected: list[str] | None = None
) -> None:
    """Run ``save`` (PEFT's ``save_pretrained``) into a staging directory inside ``save_directory``, then move the
    files into place, each with an atomic rename on the same file system.

    It works wherever the directory itself is writable: a mount point, a directory under a read-only parent, a
    symlink (followed: the link stays, its target gets the adapter). While the files move, a marker
    (:data:`SAVE_IN_PROGRESS`) says so: a process killed at any moment leaves the old
    adapter, the new one, or a directory that ``PeftModel.from_pretrained`` refuses as an interrupted save, never
    a silent mix of two saves. The next save clears what a killed one left. Other files in the directory are kept,
    and an existing ``README.md`` is updated, not replaced (see :func:`write_model_card`). An unfitted adapter is
    refused before anything is written.
    """
    tuner = residual_tuner(model)
    for adapter_name in selected or list(model.peft_config):
        tuner.readout.check_fitted(adapter_name)
    target = Path(save_directory).resolve()
    if target.is_file():
        raise ResiDualInputError(f"{target} is a file; save_pretrained needs a directory.")
    if not target.is_dir():
        target.mkdir(parents=True)
    for leftover in target.glob(f"{STAGING_PREFIX}*"):  # a killed save's staging directory
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    try:
        if (target / "README.md").is_file():  # PEFT's card step then updates the user's card in place
            shutil.copy2(target / "README.md", staging / "README.md")
        save(str(staging))
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == CONFIG_NAME)
        marker = target / SAVE_IN_PROGRESS
        marker.write_text("\n".join(str(p.relative_to(staging)) for p in files) + "\n")
        mode = 0o666 & ~_umask()
        for path in files:
            # safetensors writes through a private temporary file (mode 0600); the adapter is shared as any other
            # file the user writes is, so every file takes the mode the umask gives a new file
            path.chmod(mode)
            destination = target / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
        marker.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
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
    classifier: Any = None,
) -> str:
    """Upload a ResiDual adapter (config, safetensors, model card) to ``repo_id`` in one commit; returns its URL.
    ``classifier`` (a ``peft_residual.Classifier``: the frozen head the scales were trained against, or a trained
    head) goes with it into ``classifier/``, where ``Classifier.from_pretrained(repo_id, subfolder="classifier")``
    and ``peft-residual eval`` read it.

    Everything is staged in a temporary directory, so a failed upload leaves no local trace.

    Example:
        >>> push_adapter_to_hub(model, "me/clip-residual-cifar10", training={"dataset": "cifar10"}, classifier=head)
    """
    adapter_name, config = _residual_config(model, adapter_name)
    if config is None:
        raise ResiDualInputError(f"Adapter {adapter_name!r} is not a ResiDual adapter.")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging, selected_adapters=[adapter_name])
        folder = Path(staging) if adapter_name == "default" else Path(staging) / adapter_name
        card = model_card(model, adapter_name, training, classifier)
        card.text = card.text.replace("REPO_ID", repo_id)
        card.save(folder / "README.md")
        if classifier is not None:
            classifier.save_pretrained(folder / CLASSIFIER_DIR)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=[*ADAPTER_FILES, "README.md", f"{CLASSIFIER_DIR}/*"],
            delete_patterns=[f"{CLASSIFIER_DIR}/*"],  # an earlier push's head must not stay beside other scales
            commit_message=commit_message or "Upload ResiDual adapter",
            revision=revision,
        )
    return str(commit)
