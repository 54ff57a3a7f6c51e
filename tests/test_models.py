"""Model support is a registry: a family registers its classes from one file of peft_residual/models/, and every
registry entry is one kind of thing, a function giving a model's ArchitectureSpec."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_residual.models as models
from peft_residual import ResiDualConfig, ResiDualInputError, fit_residual_bases
from peft_residual.models import ARCHITECTURES, REFUSED, Architecture, ArchitectureSpec, register_model

from .conftest import images, loader, make_model

TOY_FAMILY = '''
"""A toy family: a CLIP vision tower inside a model of another library, registered from this one file."""

from torch import nn

from peft_residual.models import ArchitectureSpec, Sizes, register_model
from peft_residual.models.transformers import CLIP_TOWER


class ToyViT(nn.Module):
    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.backbone = tower

    def forward(self, pixel_values):
        return self.backbone(pixel_values=pixel_values).pooler_output


def _sizes(model: nn.Module) -> Sizes:
    config = model.backbone.config
    heads = config.num_attention_heads
    return Sizes(config.num_hidden_layers, heads, config.hidden_size, config.hidden_size // heads, config.patch_size)


@register_model("peft_residual.ToyViT")  # its model_key: "library.ClassName" outside transformers
def toy_spec(model: nn.Module) -> ArchitectureSpec:
    return CLIP_TOWER.under("backbone", tower="backbone", sizes=_sizes)
'''


def test_a_new_family_is_one_new_file(tmp_path, monkeypatch):
    (tmp_path / "toy_family.py").write_text(TOY_FAMILY)
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    try:
        models.register_families()  # as `import peft_residual` does: every module of the package
        toy_module = sys.modules["peft_residual.models.toy_family"]
        assert ARCHITECTURES["peft_residual.ToyViT"] is toy_module.toy_spec
        toy = toy_module.ToyViT(make_model("clip_vision")).eval()
        assert Architecture(toy).model is toy and Architecture(toy).spec.tower == "backbone"

        adapted = get_peft_model(toy, ResiDualConfig(k=2))
        fit_residual_bases(adapted, loader(), progress=False)
        reference = get_peft_model(make_model("clip_vision"), ResiDualConfig(k=2))
        fit_residual_bases(reference, loader(), progress=False)
        x = images(3, seed=5)
        with torch.no_grad():
            expected = reference(pixel_values=x).pooler_output
            torch.testing.assert_close(adapted(pixel_values=x), expected, rtol=0, atol=1e-6)
            with adapted.disable_adapter():
                assert not torch.allclose(adapted(pixel_values=x), expected)  # the base output: the adapter acted
    finally:
        ARCHITECTURES.pop("peft_residual.ToyViT", None)
        sys.modules.pop("peft_residual.models.toy_family", None)


def test_every_entry_gives_a_spec_and_lives_in_a_family_file(kind):
    model = make_model(kind)
    found = models.find_base_model(model)
    spec_of = ARCHITECTURES[models.model_key(found)]
    assert isinstance(spec_of(found), ArchitectureSpec)
    family = Path(inspect.getfile(spec_of))
    assert family.parent == Path(models.__file__).parent
    assert family.stem not in {"architecture", "loading", "registry", "spec", "__init__"}


def test_registry_entries_are_functions_and_keys_are_registered_once():
    assert ARCHITECTURES and all(
        callable(entry) and not isinstance(entry, ArchitectureSpec) for entry in ARCHITECTURES.values()
    )
    assert not set(ARCHITECTURES) & set(REFUSED)
    with pytest.raises(ValueError, match="once"):
        register_model("CLIPVisionModel")
    with pytest.raises(ValueError, match="once"):
        models.refuse_model("SiglipModel", reason="twice")
    assert importlib.import_module("peft_residual").ARCHITECTURES is ARCHITECTURES


@pytest.mark.parametrize("spelling", ["{tmp}/nope", "./no-such-model-dir", "~/no-such-model-dir"])
def test_a_model_path_that_does_not_exist_is_named_as_a_path(tmp_path, spelling):
    """A path-looking name that is not there is refused as a path, before the Hub refuses its spelling as a repo id
    (a newcomer's typo in the offline quickstart got huggingface_hub's 'Repo id must be in the form ...')."""
    name = spelling.format(tmp=tmp_path)
    with pytest.raises(ResiDualInputError, match=r"No model at .*: the path does not exist"):
        models.load_vision_model(name)
