"""ResiDualConfig stands alone (peft, the standard library and torch), reads its allowed values off its Literal
annotations, and refuses a bad value when it is created, loaded or set."""

from __future__ import annotations

import ast
import re
import sys
import typing
from pathlib import Path

import pytest

from peft_residual import ResiDualConfig, ResiDualInputError
from peft_residual.tuner import config as config_module


def test_config_imports_only_peft_the_standard_library_and_torch():
    tree = ast.parse(Path(config_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {"peft", "torch", "__future__"} | set(sys.stdlib_module_names), roots


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
