"""What ResiDual needs from PEFT while it lives outside PEFT's tree, in one place.

- ``PeftType`` is a closed enum: :func:`extend_peft_type` adds ``RESIDUAL`` once (idempotent across reloads).
- ``PeftModel.save_pretrained`` writes files in place and PEFT's generic model card; ``push_to_hub`` then replaces
  the card with transformers' template. :func:`install` wraps the three ``PeftModel`` methods so that, *for a model
  whose adapters are all ResiDual*, saving is atomic, safetensors only, and refuses unfitted adapters, the card is
  ResiDual's, and a push uploads exactly the adapter files and that card. Every other model takes PEFT's own code
  path unchanged.
- ``PeftModel.from_pretrained`` reads ``adapter_config.json`` with PEFT's generic reader before it knows the method,
  so a file that is not JSON surfaces as a bare ``JSONDecodeError``: :func:`install` makes that reader name the file
  and the fix, for every method (the only change it makes outside ResiDual's models); and before a ResiDual config
  is read from a local adapter directory (``ResiDualConfig.from_pretrained``, which ``PeftModel.from_pretrained`` and
  ``load_adapter`` call), :func:`.hub.check_saved_adapter` refuses a directory that an interrupted save, a
  missing or a damaged weights file left unusable, naming the file.
- PEFT 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` in every ``PeftModel``; the
  ``FutureWarning`` that raises is PEFT's to fix, not the user's, and is filtered by its exact message.

Inside PEFT none of this would exist: the enum member would be declared, and the card and saving hooks would be
methods of the tuner.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

NAME = "residual"


def extend_peft_type(name: str = NAME):
    """Add a member to ``PeftType`` once; later calls (re-imports, reloads) return the existing member."""
    from peft.utils import PeftType

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


def is_residual_model(model) -> bool:
    """Whether every adapter of ``model`` is a ResiDual adapter (so ResiDual's saving and card apply)."""
    configs = getattr(model, "peft_config", {})
    return bool(configs) and all(config.peft_type == NAME.upper() for config in configs.values())


def _wrap(name: str, replacement) -> None:
    from peft import PeftModel

    original = getattr(PeftModel, name)
    if getattr(original, "_residual_original", None) is not None:
        return

    @functools.wraps(original)
    def method(self, *args: Any, **kwargs: Any) -> Any:
        if not is_residual_model(self):
            return original(self, *args, **kwargs)
        return replacement(original, self, *args, **kwargs)

    method._residual_original = original
    setattr(PeftModel, name, method)


def _save_pretrained(original, model, save_directory: str, *args: Any, **kwargs: Any) -> None:
    from .errors import ResiDualInputError
    from .hub import save_adapter_atomically

    if kwargs.get("safe_serialization", args[0] if args else True) is False:
        raise ResiDualInputError(
            "save_pretrained(safe_serialization=False) would write adapter_model.bin, a pickle; ResiDual adapters "
            "are saved and loaded as safetensors only, so that loading one never runs pickled code. Drop the "
            "argument."
        )
    if not kwargs.get("is_main_process", True):
        return original(model, save_directory, *args, **kwargs)
    save = lambda directory: original(model, directory, *args, **kwargs)  # noqa: E731
    save_adapter_atomically(model, save_directory, save, kwargs.get("selected_adapters"))


def _model_card(original, model, output_dir: str) -> None:
    from .hub import write_model_card

    write_model_card(model, output_dir)


def _push_to_hub(original, model, repo_id: str, *args: Any, **kwargs: Any) -> str:
    from .hub import push_adapter_to_hub

    if args:
        raise TypeError("push_to_hub of a ResiDual adapter takes keyword arguments only after repo_id.")
    return push_adapter_to_hub(model, repo_id, **kwargs)


def _name_malformed_config_files() -> None:
    from peft.config import PeftConfigMixin

    original = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(original, "_residual_original", None) is not None:
        return

    @functools.wraps(original)
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        from .errors import ResiDualInputError

        try:
            return original(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as error:
            raise ResiDualInputError(
                f"{path_json_file} is not valid JSON ({error}); the adapter directory is damaged. Restore the file "
                "or save the adapter again."
            ) from None

    from_json_file._residual_original = original
    PeftConfigMixin.from_json_file = classmethod(from_json_file)


def _check_residual_directories() -> None:
    from peft.config import PeftConfigMixin

    original = PeftConfigMixin.__dict__["from_pretrained"].__func__
    if getattr(original, "_residual_original", None) is not None:
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        from peft.utils import CONFIG_NAME

        from .hub import check_saved_adapter
        from .tuner.config import ResiDualConfig

        directory = Path(pretrained_model_name_or_path, subfolder or "")
        if issubclass(cls, ResiDualConfig) and (directory / CONFIG_NAME).is_file():
            check_saved_adapter(directory)
        return original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    from_pretrained._residual_original = original
    PeftConfigMixin.from_pretrained = classmethod(from_pretrained)


def install() -> None:
    """Add ``PeftType.RESIDUAL``, register the tuner with PEFT, route ``save_pretrained``,
    ``create_or_update_model_card`` and ``push_to_hub`` of ResiDual models to :mod:`peft_residual.hub`, and name
    the file in PEFT's error for a malformed adapter config, and check a local ResiDual adapter directory before
    its config is read; idempotent."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .tuner import ResiDualConfig, ResiDualModel

    member = extend_peft_type()
    if member not in PEFT_TYPE_TO_TUNER_MAPPING:  # registered once per process, whatever is reloaded
        register_peft_method(name=NAME, config_cls=ResiDualConfig, model_cls=ResiDualModel)
    _wrap("save_pretrained", _save_pretrained)
    _wrap("create_or_update_model_card", _model_card)
    _wrap("push_to_hub", _push_to_hub)
    _name_malformed_config_files()
    _check_residual_directories()
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning, module="transformers"
    )


def __getattr__(name: str):
    if name == "RESIDUAL_PEFT_TYPE":
        return extend_peft_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
