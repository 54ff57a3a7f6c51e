"""ResiDualConfig stands alone (peft, the standard library, torch and the package's two leaf modules), reads its
allowed values off its Literal annotations, and refuses a bad value when it is created, loaded or set."""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
import typing
from pathlib import Path

import pytest
from peft import PeftModel, get_peft_model

from peft_residual import ResiDualConfig, ResiDualInputError
from peft_residual.tuner import config as config_module

from .conftest import make_model
from .testing_utils import fitted

LEAVES = {"errors", "unit_names"}
"""The package's leaf modules: they import nothing from the package, so the config may import them."""


def _imports(module) -> tuple[set[str], set[str]]:
    """The roots of the absolute imports of ``module``'s file, and the modules its relative imports name."""
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    return {name.split(".")[0] for name in imported}, {"." * node.level + (node.module or "") for node in relative}


def test_config_imports_only_peft_the_standard_library_torch_and_the_leaves():
    roots, relative = _imports(config_module)
    assert roots <= {"peft", "torch", "__future__"} | set(sys.stdlib_module_names), roots
    assert relative <= {f"..{leaf}" for leaf in LEAVES}, relative
    for leaf in LEAVES:
        roots, relative = _imports(importlib.import_module(f"peft_residual.{leaf}"))
        assert roots <= {"__future__"} | set(sys.stdlib_module_names) and not relative, (leaf, roots, relative)


@pytest.mark.parametrize("name", ["units", "rest", "remainder", "lambda_init", "scale_per", "ln_mean", "basis_dtype"])
def test_allowed_values_are_the_literal_annotations(name):
    allowed = typing.get_args(typing.get_type_hints(ResiDualConfig)[name])
    assert config_module.choices(name) == allowed and allowed
    for value in allowed:
        ResiDualConfig(**{name: value})
    with pytest.raises(ResiDualInputError, match=re.escape(f"ResiDualConfig.{name} must be one of {allowed}, got")):
        ResiDualConfig(**{name: "nonsense"})
    config = ResiDualConfig()
    with pytest.raises(ResiDualInputError, match=f"{name} must be one of"):
        setattr(config, name, "nonsense")
    assert getattr(config, name) == getattr(ResiDualConfig(), name)  # the refused value is not kept


def test_set_fields_are_normalised_and_checked_against_each_other():
    config = ResiDualConfig()
    config.layers = [3, 1, 3]
    assert config.layers == [1, 3]
    with pytest.raises(ResiDualInputError, match="not both"):
        config.heads = ["layer1.head0"]
    config.layers = None
    config.heads = ["layer1.head2", "layer0.head1"]
    assert config.heads == ["layer0.head1", "layer1.head2"]
    with pytest.raises(ResiDualInputError, match="not both"):
        config.layers = [0]
    config.target_modules = ["written.by.the.tuner"]  # unchecked: the tuner writes it at injection


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "at least 1"),
        ({"k": 1.5}, r"in \(0, 1\)"),
        ({"k": "64"}, "must be an int"),
        ({"units": "embedding"}, "units must be one of"),
        ({"rest": "drop"}, "rest must be one of"),
        ({"lambda_init": "zeros"}, "lambda_init must be one of"),
        ({"remainder": "both"}, "remainder must be one of"),
        ({"layers": []}, "non-empty list"),
    ],
)
def test_malformed_config_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResiDualConfig(**kwargs)


def test_layers_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        get_peft_model(make_model("clip_vision"), ResiDualConfig(k=2, layers=[5]))


def test_malformed_saved_config_is_a_clear_error(tmp_path):
    model = fitted("clip_vision", ResiDualConfig(k=2))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["rest"] = "everything"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rest must be one of"):
        PeftModel.from_pretrained(make_model("clip_vision"), tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": ["layer9.head0"]}, "names layer9.head0, which this model does not have"),
        ({"heads": ["layer0.head7"]}, "heads 0..3"),
    ],
)
def test_heads_the_model_lacks_are_clear_errors(kwargs, message):
    with pytest.raises(ResiDualInputError, match=message):
        get_peft_model(make_model("dinov2"), ResiDualConfig(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"heads": ["head3"]}, "names like 'layer11.head3'"), ({"heads": ["layer0.head1"], "layers": [0]}, "not both")],
)
def test_malformed_head_selections_are_clear_errors(kwargs, message):
    with pytest.raises(ResiDualInputError, match=message):
        ResiDualConfig(**kwargs)
