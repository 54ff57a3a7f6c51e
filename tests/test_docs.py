"""Every Python block in README.md and docs/*.md runs, offline, on tiny random models.

A block that cannot run offline is preceded by an HTML comment ``<!-- not run: reason -->``. The names a block uses
without defining them (``clip``, ``loader``, ``train``, ...) come from :func:`namespace`, tiny stand-ins for the
reader's own model and data.
"""

from __future__ import annotations

import re
from pathlib import Path

import open_clip
import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

import peft_residual
from peft_residual import CentroidClassifier, ResiDualConfig, fit_residual_bases

from .conftest import CLASS_NAMES, TEXT, image_dataset, images, loader, make_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, match in enumerate(BLOCK.finditer(path.read_text())):
            if not match["before"].startswith("<!-- not run"):
                found.append((f"{path.relative_to(ROOT)}#{number}", match["code"]))
    return found


def namespace(tmp_path: Path) -> dict:
    clip = make_model("clip")
    model = get_peft_model(make_model("clip_vision_projection"), ResiDualConfig(k=4))
    fit_residual_bases(model, loader(), progress=False)
    train, val = image_dataset(64), image_dataset(16, seed=4)
    classifier = CentroidClassifier.from_model(model, DataLoader(train, batch_size=32), CLASS_NAMES, progress=False)
    return {
        **{name: getattr(peft_residual, name) for name in peft_residual.__all__},
        "clip": clip, "clip_again": make_model("clip"), "loader": loader(), "tokenizer": word_tokenizer(),
        "class_names": CLASS_NAMES, "train_dataset": image_dataset(64), "x": images(2), "adapter_dir": tmp_path / "a",
        "model": model, "train": train, "val": val, "classifier": classifier, "DataLoader": DataLoader,
        "torch": torch, "open_clip_model": make_model("open_clip"), "timm_model": make_model("timm"),
        "open_clip_tokenizer": lambda texts: open_clip.tokenize(texts, context_length=16) % TEXT["vocab_size"],
    }  # fmt: skip


def test_the_docs_have_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("name,code", python_blocks(), ids=[name for name, _ in python_blocks()])
def test_python_block_runs(name, code, tmp_path):
    exec(compile(code, name, "exec"), namespace(tmp_path))
