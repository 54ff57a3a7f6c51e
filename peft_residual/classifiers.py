"""Frozen classifiers that ResiDual aligns to: CLIP zero-shot text heads and class centroids."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .data.units import UnitStore
from .errors import ResiDualInputError
from .inference import embed_batches
from .moments import sum_across_processes
from .tuner.decomposition import contributions


def load_templates(name_or_templates: str | Sequence[str]) -> list[str]:
    """A prompt-template ensemble: a shipped name (``"imagenet"``, ``"cifar10"``, ...) or the templates themselves.

    Example:
        >>> len(load_templates("imagenet"))
        80
    """
    if isinstance(name_or_templates, str):
        shipped = json.loads(resources.files("peft_residual").joinpath("templates/openai.json").read_text())
        if name_or_templates not in shipped:
            raise ResiDualInputError(
                f"No template set named {name_or_templates!r}; shipped sets: {', '.join(sorted(shipped))}. "
                "Pass a list of templates with '{}' for the class name instead."
            )
        return shipped[name_or_templates]
    templates = list(name_or_templates)
    if not templates:
        raise ResiDualInputError("The template list is empty; give at least one template such as 'a photo of a {}.'.")
    for template in templates:
        if "{}" not in template:
            raise ResiDualInputError(f"Template {template!r} has no '{{}}' where the class name goes.")
    return templates


class Classifier(nn.Module):
    """Logits ``scale * normalize(x) @ weights.T`` for fixed, unit-norm class vectors ``weights`` ``[classes, dim]``."""

    kind = "classifier"
    head_name = "frozen head"
    """How results name this head: "zero-shot" only for a text head, "centroids" for class centroids."""

    def __init__(self, weights: torch.Tensor, scale: float, class_names: Sequence[str]) -> None:
        super().__init__()
        if len(class_names) == 0:
            raise ResiDualInputError("The class list is empty; give at least one class name.")
        if weights.shape[0] != len(class_names):
            raise ResiDualInputError(f"{weights.shape[0]} class vectors but {len(class_names)} class names.")
        self.register_buffer("weights", F.normalize(weights.float(), dim=-1))
        self.scale = float(scale)
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(torch.promote_types(features.dtype, torch.float32))
        return self.scale * F.normalize(features, dim=-1) @ self.weights.T.to(features.dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``classifier.safetensors`` and ``classifier.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"weights": self.weights.contiguous()}, directory / "classifier.safetensors")
        meta = {"kind": self.kind, "scale": self.scale, "class_names": self.class_names}
        (directory / "classifier.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | Path, subfolder: str | None = None) -> Classifier:
        """Load a classifier written by :meth:`save_pretrained` (any kind) from a directory, or from a Hub
        repository (``"owner/name"``; pushed with its adapter, it is in ``subfolder="classifier"``).

        Example:
            >>> head = Classifier.from_pretrained("me/clip-residual-cifar10", subfolder="classifier")
        """
        local = Path(directory, subfolder or "")
        if not Path(directory).exists() and str(directory).count("/") == 1:  # a Hub repository
            local = _hub_classifier(str(directory), subfolder)
        directory = local
        path = directory / "classifier.json"
        if not path.exists():
            raise ResiDualInputError(f"No classifier at {directory}: {path.name} is missing.")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ResiDualInputError(f"{path} is not valid JSON ({error}); save the classifier again.") from None
        kinds = {c.kind: c for c in (ZeroShotClassifier, CentroidClassifier, LinearClassifier)}
        if meta.get("kind") not in kinds:
            raise ResiDualInputError(f"{directory}/classifier.json has unknown kind {meta.get('kind')!r}.")
        if meta["kind"] == LinearClassifier.kind:
            tensors = load_file(directory / "classifier.safetensors")
            return LinearClassifier(tensors["weight"], tensors["bias"], meta["class_names"])
        weights = load_file(directory / "classifier.safetensors")["weights"]
        classifier = kinds[meta["kind"]](weights, meta["scale"], meta["class_names"])
        classifier.weights.copy_(weights)  # as saved, not normalised a second time
        return classifier


def text_tower(model: nn.Module) -> str | None:
    """Which text tower ``model`` has: ``"clip"`` (transformers' ``get_text_features``), ``"blip"``
    (``BlipForImageTextRetrieval``'s text encoder and ``text_proj``), ``"open_clip"`` (``encode_text``), or ``None``."""
    if hasattr(model, "text_encoder") and hasattr(model, "text_proj"):
        return "blip"
    if hasattr(model, "encode_text") and hasattr(model, "visual"):
        return "open_clip"
    return "clip" if hasattr(model, "get_text_features") else None


def text_embedder(model: nn.Module, tokenizer) -> Callable[[Sequence[str]], torch.Tensor]:
    """A function from texts to ``model``'s text embeddings ``[texts, dim]`` (float32, not normalised, on the model's
    device), through its text tower (:func:`text_tower`) and ``tokenizer`` (a transformers tokenizer, or
    ``open_clip.get_tokenizer(name)`` for an open_clip model): the one reader of a text tower, for zero-shot heads
    and TextSpan.

    Example:
        >>> embed = text_embedder(clip, tokenizer)
        >>> embed(["a photo of a cat", "a photo of a dog"]).shape
        torch.Size([2, 512])
    """
    kind, device = text_tower(model), next(model.parameters()).device
    if kind is None:
        raise ResiDualInputError(
            f"{type(model).__name__} has no text tower (a CLIP, BLIP or open_clip model has one); use class centroids."
        )
    if kind == "open_clip":
        return lambda texts: model.encode_text(tokenizer(list(texts)).to(device)).float()

    def embed(texts: Sequence[str]) -> torch.Tensor:
        tokens = tokenizer(list(texts), padding=True, return_tensors="pt").to(device)
        if kind == "clip":
            return model.get_text_features(**tokens).pooler_output.float()
        text = model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return model.text_proj(text.last_hidden_state[:, 0]).float()

    return embed


def _hub_classifier(repo_id: str, subfolder: str | None) -> Path:
    """The local directory of a classifier in a Hub repository (its two files, downloaded), or an error naming the
    fix where the repository holds none there."""
    from huggingface_hub import file_exists, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from .hub import CLASSIFIER_DIR

    try:  # the download asks the Hub whether the file is there: no request of its own beforehand
        meta = hf_hub_download(repo_id, "classifier.json", subfolder=subfolder)
    except RemoteEntryNotFoundError:
        where = f"{subfolder}/" if subfolder else ""
        pushed = not subfolder and file_exists(repo_id, f"{CLASSIFIER_DIR}/classifier.json")
        hint = f' (it has one in {CLASSIFIER_DIR}/: pass subfolder="{CLASSIFIER_DIR}")' if pushed else ""
        raise ResiDualInputError(
            f"The Hub repository {repo_id} holds no classifier{f' in {where}' if where else ''}{hint}; push one with "
            "its adapter (push_to_hub(..., classifier=head), as the CLI's push does), or load it from a directory."
        ) from None
    hf_hub_download(repo_id, "classifier.safetensors", subfolder=subfolder)
    return Path(meta).parent


class ZeroShotClassifier(Classifier):
    """Zero-shot text head (CLIP, BLIP): per class, the renormalised mean of the normalised text embeddings of every
    template.

    Example:
        >>> clf = ZeroShotClassifier.from_clip(clip, tokenizer, ["cat", "dog"], templates="cifar10")
        >>> clf(image_embeds).argmax(-1)
    """

    kind = "zero_shot"
    head_name = "zero-shot"

    @classmethod
    @torch.no_grad()
    def from_clip(
        cls,
        clip_model: nn.Module,
        tokenizer,
        class_names: Sequence[str],
        templates: str | Sequence[str] = "imagenet",
        batch_size: int = 256,
    ) -> ZeroShotClassifier:
        """Embed ``template.format(name)`` for every class and template with the CLIP text tower."""
        scale = float(clip_model.logit_scale.detach().exp())
        return cls._from_prompts(text_embedder(clip_model, tokenizer), class_names, templates, batch_size, scale)

    @classmethod
    @torch.no_grad()
    def from_open_clip(
        cls,
        model: nn.Module,
        tokenizer,
        class_names: Sequence[str],
        templates: str | Sequence[str] = "imagenet",
        batch_size: int = 256,
    ) -> ZeroShotClassifier:
        """The same with an ``open_clip`` model's text tower (``encode_text``) and its tokenizer
        (``open_clip.get_tokenizer(name)``, which returns token ids); the scale is ``exp(logit_scale)``.

        Example:
            >>> clf = ZeroShotClassifier.from_open_clip(model, open_clip.get_tokenizer("ViT-B-16"), ["cat", "dog"])
        """
        scale = float(model.logit_scale.detach().exp())
        return cls._from_prompts(text_embedder(model, tokenizer), class_names, templates, batch_size, scale)

    @classmethod
    @torch.no_grad()
    def from_blip(
        cls,
        blip_model: nn.Module,
        tokenizer,
        class_names: Sequence[str],
        templates: str | Sequence[str] = "imagenet",
        batch_size: int = 256,
    ) -> ZeroShotClassifier:
        """The same with BLIP's contrastive text side (``BlipForImageTextRetrieval``): the text encoder's first
        token through ``text_proj``; the scale is ``exp(logit_scale_init_value)`` of its config (1 / 0.07)."""
        scale = math.exp(blip_model.config.logit_scale_init_value)
        return cls._from_prompts(text_embedder(blip_model, tokenizer), class_names, templates, batch_size, scale)

    @classmethod
    def _from_prompts(cls, embed, class_names, templates, batch_size, scale) -> ZeroShotClassifier:
        """Per class, ``embed`` (a :func:`text_embedder`) of its prompts, a batch at a time."""
        if len(class_names) == 0:
            raise ResiDualInputError("The class list is empty; give at least one class name.")
        templates = load_templates(templates)
        weights = []
        for name in class_names:
            prompts = [template.format(name) for template in templates]
            embeddings = [embed(prompts[start : start + batch_size]) for start in range(0, len(prompts), batch_size)]
            mean = F.normalize(torch.cat(embeddings), dim=-1).mean(0)
            weights.append(F.normalize(mean, dim=-1))
        return cls(torch.stack(weights).cpu(), scale, class_names)


CENTROID_AVERAGES = ("features", "normalized")
"""How a class centroid averages its examples: the raw features, or (the paper's code) each normalised first."""


def _add_to_classes(
    sums: torch.Tensor, counts: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, average: str
) -> None:
    """Add ``features`` to the float64 ``sums`` of their classes, and count them."""
    if len(labels) and int(labels.max()) >= len(counts):
        raise ResiDualInputError(
            f"Label {int(labels.max())} is outside the {len(counts)} class names; give a name for every class."
        )
    features = F.normalize(features.double(), dim=-1) if average == "normalized" else features.double()
    sums.index_add_(0, labels.to(sums.device), features.to(sums.device))
    counts += torch.bincount(labels.cpu(), minlength=len(counts)).to(counts.device)


class CentroidClassifier(Classifier):
    """Vision-only head: normalised class means of the base model's encodings, with a fixed logit scale.

    ``average="normalized"`` averages unit-norm features (as the paper's code and the zero-shot text head do);
    the default ``"features"`` averages the raw ones.

    Example:
        >>> clf = CentroidClassifier.from_model(dinov2, train_loader, class_names)
    """

    kind = "centroid"
    head_name = "centroids"

    @classmethod
    def from_features(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        scale: float = 100.0,
        average: str = "features",
    ) -> CentroidClassifier:
        if average not in CENTROID_AVERAGES:
            raise ResiDualInputError(f"Centroid average must be one of {CENTROID_AVERAGES}, got {average!r}.")
        if len(class_names) == 0:
            raise ResiDualInputError("The class list is empty; give at least one class name.")
        if len(labels) == 0:
            raise ResiDualInputError("Class centroids need at least one labelled image; the data set is empty.")
        sums = torch.zeros(len(class_names), features.shape[1], dtype=torch.float64)
        counts = torch.zeros(len(class_names), dtype=torch.long)
        _add_to_classes(sums, counts, features, labels, average)
        return cls._from_sums(sums, counts, class_names, scale)

    @classmethod
    @torch.no_grad()
    def from_units(
        cls, units: UnitStore, class_names: Sequence[str], scale: float = 100.0, average: str = "features"
    ) -> CentroidClassifier:
        """Centroids of the base model's embeddings of stored images (a :class:`~.data.UnitStore`, e.g. from
        ``collect_units``), batch by batch: no backbone pass, and memory that does not grow with the data set. A
        store sharded across processes gives every process the centroids of all its shards.

        Example:
            >>> clf = CentroidClassifier.from_units(collect_units(model, train_loader), class_names)
        """
        if average not in CENTROID_AVERAGES:
            raise ResiDualInputError(f"Centroid average must be one of {CENTROID_AVERAGES}, got {average!r}.")
        if units.labels is None:
            raise ResiDualInputError("Class centroids need labels; collect the units from batches with labels.")
        sums = torch.zeros(len(class_names), units.arch.output_dim, dtype=torch.float64)
        counts = torch.zeros(len(class_names), dtype=torch.long)
        for batch in units.records():
            _add_to_classes(sums, counts, contributions(batch.record, units.arch).sum(1), batch.labels, average)
        if units.sharded:
            sums, counts = sum_across_processes(sums), sum_across_processes(counts)
        return cls._from_sums(sums, counts, class_names, scale)

    @classmethod
    def _from_sums(
        cls, sums: torch.Tensor, counts: torch.Tensor, class_names: Sequence[str], scale: float
    ) -> CentroidClassifier:
        missing = [class_names[i] for i in range(len(class_names)) if counts[i] == 0]
        if missing:
            raise ResiDualInputError(
                f"Class {missing[0]!r} has no examples; every class needs at least one to get a centroid."
            )
        return cls((sums / counts[:, None]).float(), scale, class_names)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        batches: Iterable[dict],
        class_names: Sequence[str],
        scale: float = 100.0,
        label_column: str = "label",
        progress: bool = True,
        average: str = "features",
    ) -> CentroidClassifier:
        """Centroids of the *base* model's embeddings (no adapter applied) over batches with pixel_values/labels."""
        features, labels = embed_batches(
            model, batches, label_column, base=True, progress=progress, num_classes=len(class_names),
            desc="Class centroids",
        )  # fmt: skip
        return cls.from_features(features, labels, class_names, scale, average)


class LinearClassifier(Classifier):
    """A trainable linear head, logits ``x @ weight.T + bias`` on the (adapted) embedding: what
    ``train_residual(..., head="linear")`` trains together with the scales, and what a ``*ForImageClassification``
    model's ``classifier`` computes. It starts from a frozen head (:meth:`from_classifier`).

    Example:
        >>> head = LinearClassifier.from_classifier(centroids, embeddings)  # the centroids' logits, as a linear map
        >>> head(embed_images(peft_model, x)).argmax(-1)
    """

    kind = "linear"
    head_name = "linear head"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, class_names: Sequence[str]) -> None:
        nn.Module.__init__(self)  # no normalised class vectors: the weights are trained as they are
        if len(class_names) == 0:
            raise ResiDualInputError("The class list is empty; give at least one class name.")
        if weight.dim() != 2 or weight.shape[0] != len(class_names) or tuple(bias.shape) != (len(class_names),):
            raise ResiDualInputError(
                f"A linear head needs weight [classes, dim] and bias [classes] for {len(class_names)} class names, "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}."
            )
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.scale = 1.0
        self.class_names = list(class_names)

    @property
    def weights(self) -> torch.Tensor:
        """The weight matrix ``[classes, dim]`` (what run fingerprints hash)."""
        return self.weight

    @classmethod
    @torch.no_grad()
    def from_classifier(
        cls, classifier: Classifier, features: torch.Tensor | float, dtype: torch.dtype = torch.float32
    ) -> LinearClassifier:
        """A linear head that starts where ``classifier`` is: a copy of a linear head, or for a frozen head
        (``scale * normalize(x) @ weights.T``) the linear map ``scale * weights / r`` with ``r`` the mean norm of
        ``features`` (embeddings ``[n, dim]``, or that norm itself) and no bias, which gives the frozen head's logits
        for an embedding of typical norm."""
        if isinstance(classifier, LinearClassifier):
            return cls(classifier.weight.to(dtype), classifier.bias.to(dtype), classifier.class_names)
        norm = float(features.double().norm(dim=-1).mean()) if isinstance(features, torch.Tensor) else float(features)
        if not math.isfinite(norm) or norm <= 0:
            raise ResiDualInputError(f"A linear head starts from embeddings of positive finite norm, got {norm}.")
        weight = classifier.scale * classifier.weights.double() / norm
        return cls(weight.to(dtype), weight.new_zeros(len(weight)).to(dtype), classifier.class_names)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(features.dtype, self.weight.dtype)
        return F.linear(features.to(dtype), self.weight.to(dtype), self.bias.to(dtype))

    @torch.no_grad()
    def copy_into(self, model: nn.Module) -> nn.Linear:
        """Write this head into the classifier of ``model``, a ResiDual ``PeftModel`` of a
        ``ViTForImageClassification`` or ``Dinov2ForImageClassification``: the active adapter's copy when
        ``modules_to_save`` holds the classifier (so ``save_pretrained`` saves it), else the model's own. DINOv2's
        classifier reads ``[CLS, mean of the patch tokens]``: the patch-mean half of its weights is set to zero, so
        the model's logits are this head's on the adapted embedding. Returns the module written.

        Example:
            >>> LinearClassifier.from_classifier(centroids, base_embeddings(train_units)[0]).copy_into(peft_model)
        """
        from .tuner import active_adapter, residual_tuner

        tuner = residual_tuner(model)
        path, reads = tuner.arch.spec.classifier, tuner.arch.spec.classifier_input
        if path is None:
            raise ResiDualInputError(
                f"{type(tuner.model).__name__} has no classifier to write a head into; use the head on "
                "embed_images' output, or a ViTForImageClassification / Dinov2ForImageClassification base."
            )
        module = tuner.model.get_submodule(path)
        copies = getattr(module, "modules_to_save", {})
        adapter = active_adapter(tuner)
        target = copies[adapter] if adapter in copies else getattr(module, "original_module", module)
        weight = self.weight.detach()
        if reads == "cls+patch_mean":
            weight = torch.cat([weight, torch.zeros_like(weight)], dim=1)
        if not isinstance(target, nn.Linear) or target.weight.shape != weight.shape or target.bias is None:
            shape = tuple(target.weight.shape) if isinstance(target, nn.Linear) else type(target).__name__
            raise ResiDualInputError(
                f"The model's classifier is {shape}, but this head needs a linear map with a bias, weight "
                f"{tuple(weight.shape)}; build the model with num_labels={self.num_classes}."
            )
        target.weight.copy_(weight.to(target.weight))
        target.bias.copy_(self.bias.detach().to(target.bias))
        return target

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``classifier.safetensors`` (weight and bias, float32) and ``classifier.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float().contiguous()}
        save_file({name: tensor.cpu() for name, tensor in tensors.items()}, directory / "classifier.safetensors")
        meta = {"kind": self.kind, "scale": self.scale, "class_names": self.class_names}
        (directory / "classifier.json").write_text(json.dumps(meta, indent=1))


def default_classifier(
    model: nn.Module,
    class_names: Sequence[str],
    *,
    tokenizer_source: str | None = None,
    tokenizer=None,
    templates: str | Sequence[str] = "imagenet",
    train_batches: Iterable[dict] | None = None,
    train_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    train_units: UnitStore | None = None,
    kind: str | None = None,
    centroid_scale: float = 100.0,
    centroid_average: str = "features",
    progress: bool = True,
) -> Classifier:
    """The frozen head ResiDual aligns to: CLIP's zero-shot text head when ``model`` has a text tower, class
    centroids of the training images otherwise (or as ``kind`` says: ``"zero-shot"`` or ``"centroid"``).

    Zero-shot needs ``tokenizer_source`` (the name the model was loaded by, as for ``load_vision_model``) or a
    ``tokenizer``; centroids need ``train_features`` (base embeddings and labels), or ``train_units`` (a
    :class:`~.data.UnitStore` of the training images: no backbone pass) or ``train_batches`` to compute them from.

    Example:
        >>> train_units = collect_units(model, DataLoader(train, batch_size=64))  # the one backbone pass
        >>> classifier = default_classifier(model, names, tokenizer_source=path, train_units=train_units)
    """
    tower = text_tower(model)
    kind = kind or ("zero-shot" if tower is not None else "centroid")
    if kind == "zero-shot":
        if tower is None:
            raise ResiDualInputError(
                f"{type(model).__name__} has no text tower for a zero-shot classifier; use class centroids."
            )
        if tokenizer is None and tower == "open_clip" and tokenizer_source is None:
            raise ResiDualInputError(
                "An open_clip model's zero-shot head needs its tokenizer: pass tokenizer=open_clip.get_tokenizer(name) "
                "or tokenizer_source (the name the model was loaded by)."
            )
        if tokenizer is None:
            from .models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_source)  # open_clip.get_tokenizer or AutoTokenizer
        build = {"clip": ZeroShotClassifier.from_clip, "blip": ZeroShotClassifier.from_blip}
        build = build.get(tower, ZeroShotClassifier.from_open_clip)
        return build(model, tokenizer, class_names, templates=templates)
    if kind != "centroid":
        raise ResiDualInputError(f"Classifier kind must be 'zero-shot' or 'centroid', got {kind!r}.")
    if train_features is None and train_units is not None:
        return CentroidClassifier.from_units(train_units, class_names, centroid_scale, centroid_average)
    if train_features is None:
        if train_batches is None:
            raise ResiDualInputError("Class centroids need train_features, train_units or train_batches.")
        return CentroidClassifier.from_model(
            model, train_batches, class_names, centroid_scale, progress=progress, average=centroid_average
        )
    return CentroidClassifier.from_features(*train_features, class_names, centroid_scale, centroid_average)
