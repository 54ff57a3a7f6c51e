"""Loading a supported vision model, and its own image preprocessing, from a name as its library spells it.

- **transformers**: a Hub id (``openai/clip-vit-base-patch32``) or a ``save_pretrained`` directory.
- **open_clip**: ``hf-hub:ORG/NAME`` (a repo with ``open_clip_config.json``); a built-in model name with its pretrained
  tag, ``NAME:TAG`` as ``open_clip.list_pretrained(as_str=True)`` spells the pairs (``ViT-B-32:openai``), or with a
  local weights file, ``NAME:PATH``; a local directory in the Hub layout (``open_clip_config.json`` beside the
  weights), plain or as ``local-dir:PATH``.
- **timm**: ``timm/NAME`` (its Hub spelling) or ``hf-hub:ORG/NAME`` (a repo with timm's ``config.json``); a registry
  name with pretrained weights, ``NAME`` or ``NAME.TAG`` (``vit_base_patch16_224.augreg_in21k``); a local directory
  as ``timm.models.save_for_hf`` writes it (``config.json`` with ``architecture``, ``model.safetensors``), plain or as
  ``local-dir:PATH``.

Each library loads its own spellings (``open_clip.create_model``, ``timm.create_model``); this module only routes,
and refuses a name that no library knows with the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ResiDualInputError
from .registry import ARCHITECTURES, REFUSED, find_base_model

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
LIBRARIES = ("transformers", "open_clip", "timm")


@dataclass(frozen=True)
class ModelSource:
    """Which library loads a model name, and what to hand it.

    ``name`` is the library's own spelling (a transformers id or directory; ``open_clip.create_model``'s
    ``model_name``; ``timm.create_model``'s ``model_name``); ``pretrained`` is open_clip's pretrained tag or weights
    file for a built-in model name, and ``quick_gelu`` whether that tag's weights were trained with QuickGELU.
    """

    library: str
    name: str
    pretrained: str | None = None
    quick_gelu: bool = False


def model_source(model_name_or_path: str) -> ModelSource:
    """Route a model name to its library (see the module docstring for the spellings), or refuse it with the fix.

    Example:
        >>> model_source("ViT-B-32:openai")
        ModelSource(library='open_clip', name='ViT-B-32', pretrained='openai', quick_gelu=True)
        >>> model_source("timm/vit_small_patch14_dinov2.lvd142m").name
        'hf-hub:timm/vit_small_patch14_dinov2.lvd142m'
    """
    name = str(model_name_or_path)
    source = _route(name)
    if source.library != "transformers":
        _require(source.library, name)
    return source


def _require(library: str, spelling: str) -> None:
    """open_clip and timm are optional: a name of theirs without them installed says what to install."""
    if importlib.util.find_spec(library) is None:
        package = {"open_clip": "open_clip_torch"}.get(library, library)
        raise ResiDualInputError(
            f"{spelling} names a model of {library}, and {library} is not installed: pip install {package}"
        )


def _route(name: str) -> ModelSource:
    if name.startswith(LOCAL_DIR):
        return _local_source(Path(name[len(LOCAL_DIR) :]).expanduser(), name, explicit=True)
    if name.startswith(HF_HUB):
        return _hub_source(name[len(HF_HUB) :])
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path, name)
    if name.startswith((".", "/", "~")):  # a path, not a Hub id: the Hub would only refuse its spelling
        raise ResiDualInputError(
            f"No model at {name!r}: the path does not exist. Check the directory, or name a Hub model such as "
            "'facebook/dinov2-small'."
        )
    if name.startswith("timm/"):
        return ModelSource("timm", HF_HUB + name)
    if ":" in name and "://" not in name:
        return _open_clip_pair(name)
    if "/" not in name:
        return _registry_source(name) or ModelSource("transformers", name)
    return ModelSource("transformers", name)


def _local_source(path: Path, name: str, explicit: bool = False) -> ModelSource:
    if path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file():
        return ModelSource("open_clip", LOCAL_DIR + str(path))
    if path.is_dir() and _is_timm_config(path / "config.json"):
        return ModelSource("timm", LOCAL_DIR + str(path))
    if explicit:
        what = "holds neither" if path.is_dir() else "is not a directory with"
        raise ResiDualInputError(
            f"{name} {what} an {OPEN_CLIP_CONFIG} (open_clip) nor a timm config.json (with 'architecture'); save the "
            "model there in its library's Hub layout, or name a transformers directory without 'local-dir:'"
        )
    return ModelSource("transformers", name)


def _is_timm_config(path: Path) -> bool:
    """timm's config.json names an ``architecture``; a transformers one has a ``model_type``."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "architecture" in config and "model_type" not in config


def _hub_source(repo_id: str) -> ModelSource:
    """``hf-hub:ORG/NAME``: open_clip if the repo holds ``open_clip_config.json`` (timm's CLIP repos hold both: write
    ``timm/NAME`` for the timm tower), else timm if it holds timm's ``config.json``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if not repo_id:
        raise ResiDualInputError("'hf-hub:' names no repo; write hf-hub:ORG/NAME")
    try:
        hf_hub_download(repo_id, OPEN_CLIP_CONFIG)
        return ModelSource("open_clip", HF_HUB + repo_id)
    except EntryNotFoundError:  # not in the repo, or (offline) not in the cache
        pass
    try:
        config = Path(hf_hub_download(repo_id, "config.json"))
    except LocalEntryNotFoundError:
        raise  # offline, and neither file cached: huggingface_hub's message says so
    except EntryNotFoundError:
        config = None
    if config is not None and _is_timm_config(config):
        return ModelSource("timm", HF_HUB + repo_id)
    raise ResiDualInputError(
        f"hf-hub:{repo_id} holds neither an {OPEN_CLIP_CONFIG} (open_clip) nor a timm config.json; for a "
        f"transformers model write {repo_id} without 'hf-hub:'"
    )


def _open_clip_pair(spelling: str) -> ModelSource:
    """``NAME:TAG`` or ``NAME:PATH`` for a built-in open_clip model."""
    _require("open_clip", spelling)
    import open_clip

    model, _, pretrained = spelling.partition(":")
    model = model.replace("/", "-")  # as open_clip.create_model cleans it (OpenAI's 'ViT-B/32')
    models = open_clip.list_models()
    if model not in models:
        close = difflib.get_close_matches(model, models, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ResiDualInputError(
            f"open_clip has no model {model!r}{hint}; write NAME:TAG with a pair from "
            "open_clip.list_pretrained(as_str=True), e.g. ViT-B-32:openai, or NAME:PATH with a local weights file"
        )
    tag = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    if tag:
        return ModelSource("open_clip", model, pretrained, quick_gelu=bool(tag.get("quick_gelu", False)))
    if pretrained and Path(pretrained).expanduser().is_file():
        return ModelSource("open_clip", model, str(Path(pretrained).expanduser()))
    raise ResiDualInputError(_tag_problem(model, pretrained))


def _tag_problem(model: str, pretrained: str) -> str:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained:
        problem = f"open_clip has no pretrained tag {pretrained!r} for {model} and no file at that path"
    else:
        problem = f"{model} is an open_clip model name without weights"
    shown = ", ".join(tags[:5]) + (f", ... {len(tags)} in all: open_clip.list_pretrained()" if tags[5:] else "")
    fix = f"write {model}:TAG with one of its tags ({shown}) or" if tags else f"{model} has no pretrained tags; write"
    return f"{problem}; {fix} {model}:PATH with a local weights file"


def _registry_source(name: str) -> ModelSource | None:
    """A bare name: an open_clip model name (refused: it needs its tag), or a timm registry name with weights (each
    library asked only if installed)."""
    if importlib.util.find_spec("open_clip") is not None:
        import open_clip

        if name in open_clip.list_models():
            raise ResiDualInputError(_tag_problem(name, ""))
    if importlib.util.find_spec("timm") is None:
        return None
    import timm

    if not timm.is_model(name):
        return None
    if not timm.models.is_model_pretrained(name):
        tags = timm.list_pretrained(name.partition(".")[0] + ".*")
        raise ResiDualInputError(
            f"timm has no pretrained weights for {name!r}; name one of {', '.join(tags[:8]) or 'its pretrained models'}"
            " (timm.list_pretrained()), or a local directory written by timm.models.save_for_hf"
        )
    return ModelSource("timm", name)


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs its progress with ``logging.info`` on the root logger, which the CLI sets to INFO."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def load_vision_model(model_name_or_path: str, torch_dtype=None, image_size: int | None = None) -> nn.Module:
    """A supported model, in eval mode, from a name as its library spells it (see :func:`model_source`).

    transformers: CLIP as ``CLIPModel`` and BLIP as ``BlipForImageTextRetrieval`` (both towers, so the text side can
    build a zero-shot head), anything else through ``AutoModel``; these interpolate their position embeddings, so
    ``image_size`` is not needed. open_clip: the whole ``CLIP`` (its text tower gives the zero-shot head), built at
    ``image_size`` if given (``force_image_size``: the position embeddings are resampled). timm: with
    ``dynamic_img_size=True`` if ``image_size`` is given, so it interpolates them as transformers does.

    Example:
        >>> model = load_vision_model("ViT-B-16:laion2b_s34b_b88k")
        >>> model = load_vision_model("timm/vit_small_patch14_dinov2.lvd142m", image_size=98)
    """
    source = model_source(model_name_or_path)
    if source.library == "open_clip":
        model = _load_open_clip(source, torch_dtype, image_size)
    elif source.library == "timm":
        model = _load_timm(source, torch_dtype, image_size)
    else:
        model = _transformers_class(model_name_or_path).from_pretrained(
            model_name_or_path, **({"dtype": torch_dtype} if torch_dtype is not None else {})
        )
    model.eval()
    find_base_model(model)  # fails early, naming the supported models
    return model


def _transformers_class(name: str) -> type[nn.Module]:
    """The class a transformers model loads as, from its config alone: a directory that holds no model, or a model
    ResiDual cannot adapt, is refused before any weight is read (and before transformers' progress bar)."""
    from transformers import AutoConfig, AutoModel, BlipForImageTextRetrieval, CLIPModel

    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ResiDualInputError(
            f"{name} holds no model: a model directory has a config.json (save_pretrained writes one, as open_clip "
            f"writes {OPEN_CLIP_CONFIG}); name the directory the model was saved to"
        )
    try:
        config = AutoConfig.from_pretrained(name)
    except ValueError as error:  # a config.json transformers does not know
        raise ResiDualInputError(f"{name} holds no model transformers knows: {str(error).splitlines()[0]}") from None
    model_class = {"clip": CLIPModel, "blip": BlipForImageTextRetrieval}.get(config.model_type)
    model_class = model_class or AutoModel._model_mapping.get(type(config), None)
    key = getattr(model_class, "__name__", config.model_type)
    if key in REFUSED:
        raise ResiDualInputError(f"{name}: ResiDual cannot adapt {key}. {REFUSED[key]}")
    if key not in ARCHITECTURES:
        raise ResiDualInputError(
            f"ResiDual does not support {key} (the model in {name}), not a vision transformer it can adapt; the "
            f"supported classes are {', '.join(sorted(ARCHITECTURES))}"
        )
    return model_class


def _load_open_clip(source: ModelSource, torch_dtype, image_size: int | None) -> nn.Module:
    import open_clip

    precisions = {None: "fp32", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    if torch_dtype not in precisions:
        raise ResiDualInputError(f"open_clip models load in float32, float16 or bfloat16, not {torch_dtype}")
    try:
        with _quiet_root_logger():
            return open_clip.create_model(
                source.name, source.pretrained, precision=precisions[torch_dtype], force_image_size=image_size,
                force_quick_gelu=source.quick_gelu, require_pretrained=True,
            )  # fmt: skip
    except RuntimeError as error:  # open_clip's own message: a download, or weights that do not fit the model
        raise ResiDualInputError(f"open_clip cannot load {_spelling(source)}: {str(error).splitlines()[0]}") from error


def _load_timm(source: ModelSource, torch_dtype, image_size: int | None) -> nn.Module:
    import timm

    try:
        model = timm.create_model(source.name, pretrained=True, **({"dynamic_img_size": True} if image_size else {}))
    except RuntimeError as error:  # e.g. an architecture this timm does not know
        raise ResiDualInputError(f"timm cannot load {source.name}: {str(error).splitlines()[0]}") from error
    return model.to(torch_dtype) if torch_dtype is not None else model


def _spelling(source: ModelSource) -> str:
    return f"{source.name}:{source.pretrained}" if source.pretrained else source.name


def load_tokenizer(model_name_or_path: str):
    """The tokenizer of an open_clip model (``open_clip.get_tokenizer``) or of a transformers one
    (``AutoTokenizer``), for its zero-shot text head; timm models have no text tower."""
    source = model_source(model_name_or_path)
    if source.library == "open_clip":
        import open_clip

        with _quiet_root_logger():
            return open_clip.get_tokenizer(source.name)
    if source.library == "timm":
        raise ResiDualInputError(f"{model_name_or_path} is a timm image model without a text tower; use centroids")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_name_or_path)


def image_preprocessor(model_name_or_path: str, image_size: int | None = None) -> Callable | None:
    """An open_clip or timm model's own eval transform (a PIL image to a ``[3, H, W]`` tensor), read from its config
    without building the model; ``None`` for a transformers model (its image processor serves).

    open_clip: ``image_transform_v2`` of the preprocess config that ``create_model`` sets on the model (defaults,
    then the config's or the tag's, then the model's image size). timm: ``create_transform`` of
    ``resolve_data_config``. ``image_size`` resizes straight to a square of that side (no crop), as for transformers
    models."""
    source = model_source(model_name_or_path)
    if source.library == "open_clip":
        return _open_clip_preprocessor(source, image_size)
    if source.library == "timm":
        import timm.data
        import timm.models

        resolve = getattr(timm.models, "resolve_model_input_args", None)
        if resolve is not None:
            pretrained_cfg = resolve(source.name)["pretrained_cfg"]
        else:  # an older timm: the architecture without its weights carries the same config
            pretrained_cfg = timm.create_model(source.name, pretrained=False).pretrained_cfg
        config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)
        if image_size:
            config.update(input_size=(3, image_size, image_size), crop_pct=1.0, crop_mode="squash")
        return timm.data.create_transform(**config)
    return None


def _open_clip_preprocessor(source: ModelSource, image_size: int | None) -> Callable:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    if source.name.startswith(LOCAL_DIR):
        config = json.loads((Path(source.name[len(LOCAL_DIR) :]) / OPEN_CLIP_CONFIG).read_text())
    elif source.name.startswith(HF_HUB):
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(source.name[len(HF_HUB) :], OPEN_CLIP_CONFIG)).read_text())
    else:
        tag = open_clip.get_pretrained_cfg(source.name, source.pretrained) if source.pretrained else {}
        config = {"model_cfg": open_clip.get_model_config(source.name), "preprocess_cfg": tag}
    preprocess = merge_preprocess_dict(PreprocessCfg(), config.get("preprocess_cfg") or {})
    size = config.get("model_cfg", config)["vision_cfg"].get("image_size", preprocess["size"])
    preprocess["size"] = (size, size) if isinstance(size, int) else tuple(size)
    if image_size:
        preprocess.update(size=(image_size, image_size), resize_mode="squash")
    return image_transform_v2(PreprocessCfg(**preprocess), is_train=False)
