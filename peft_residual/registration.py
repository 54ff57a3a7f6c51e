"""Registration of "residual" with PEFT, whose ``PeftType`` is a closed enum."""

from __future__ import annotations

from peft.utils import PeftType

NAME = "residual"


def _extend_peft_type(name: str) -> PeftType:
    """Add a member to ``PeftType`` once; later calls (re-imports, reloads) return the existing member."""
    key = name.upper()
    if key in PeftType.__members__:
        return PeftType[key]
    member = str.__new__(PeftType, key)
    member._name_ = key
    member._value_ = key
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, key, member)
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    return member


RESIDUAL_PEFT_TYPE = _extend_peft_type(NAME)


def register(config_cls: type, model_cls: type) -> None:
    """Register (or, after a reload, re-register) the ResiDual config and tuner classes with PEFT."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if RESIDUAL_PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[RESIDUAL_PEFT_TYPE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[RESIDUAL_PEFT_TYPE] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[RESIDUAL_PEFT_TYPE] = model_cls.prefix
    else:
        register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
