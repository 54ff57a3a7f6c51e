"""Registering the RESIDUAL method with PEFT: once, under any import order, and again after a reload."""

import importlib

import pytest
from peft import get_peft_model
from peft.utils import PeftType

import peft_residual

from .conftest import make_model


def test_registration_survives_reimport_and_reload():
    importlib.reload(peft_residual.compat)
    importlib.reload(peft_residual.tuner)
    importlib.reload(peft_residual)
    assert PeftType("RESIDUAL") is PeftType.RESIDUAL
    assert list(PeftType).count(PeftType.RESIDUAL) == 1
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.RESIDUAL] is peft_residual.ResiDualModel
    model = get_peft_model(make_model("clip_vision"), peft_residual.ResiDualConfig(k=2))
    assert isinstance(model.base_model, peft_residual.ResiDualModel)


@pytest.mark.parametrize(
    "first",
    [pytest.param("peft_residual", marks=pytest.mark.slow), "peft_residual.training.trainer", "peft_residual.cli"],
)
def test_any_import_order_registers_the_method_before_peft_is_used(first):
    import subprocess
    import sys

    probe = (
        f"import {first}, sys\n"
        "assert 'peft' not in sys.modules or 'RESIDUAL' in __import__('peft').PeftType.__members__\n"
        "assert not any('peft_residual' in type(finder).__module__ for finder in sys.meta_path)\n"
        "from peft import PeftConfig, PeftModel, PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "print(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RESIDUAL].__name__, hasattr(PeftModel.push_to_hub, "
        "'_residual_original'))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ResiDualConfig", "True"]
