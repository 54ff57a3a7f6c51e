"""Image data sets for ResiDual: load by Hub id or local path, subsample, split, check, and turn images into
``pixel_values``."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import AutoImageProcessor

from ..errors import ResiDualInputError
from ..inference import check_labels
from .units import UnitStore, content_hash

logger = logging.getLogger(__name__)


def load_image_dataset(name_or_path: str, split: str | None = None) -> datasets.Dataset | datasets.DatasetDict:
    """A ``datasets`` data set from a directory written by ``save_to_disk`` or, otherwise, from the Hub."""
    if Path(name_or_path).exists():
        dataset = datasets.load_from_disk(name_or_path)
    else:
        dataset = datasets.load_dataset(name_or_path)
    if isinstance(dataset, datasets.Dataset):  # one table without splits: its images are the training split
        dataset = datasets.DatasetDict({"train": dataset})
    if split is None:
        return dataset
    if split not in dataset:
        raise ResiDualInputError(
            f"{name_or_path} has no split {split!r}; it has {sorted(dataset)}. Save a DatasetDict with that split, "
            "or name one of these."
        )
    return dataset[split]


def as_image_classification(
    dataset: datasets.Dataset, image_column: str = "image", label_column: str = "label"
) -> datasets.Dataset:
    """``dataset`` with an ``Image`` column and integer labels: a column of file paths or encoded bytes is decoded
    like an ``Image`` column (``cast_column``), and string labels become a ``ClassLabel`` (``class_encode_column``,
    names sorted), so that :func:`class_names` gives the classifier's classes.

    Example:
        >>> data = as_image_classification(Dataset.from_dict({"image": ["a.png"], "label": ["cat"]}))
    """
    check_columns(dataset, image_column, label_column)
    if not isinstance(dataset.features[image_column], datasets.Image):
        try:
            dataset = dataset.cast_column(image_column, datasets.Image())
        except (TypeError, ValueError) as error:
            raise ResiDualInputError(
                f"Column {image_column!r} holds {dataset.features[image_column]}, not images, image file paths or "
                f"encoded image bytes ({error}); pass --image-column (or image_column) naming the images."
            ) from None
    label = dataset.features[label_column]
    if isinstance(label, datasets.Value) and label.dtype in ("string", "large_string"):
        dataset = dataset.class_encode_column(label_column)
    return dataset


def check_columns(dataset: datasets.Dataset, *columns: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ResiDualInputError(
            f"No column {missing[0]!r} in the data set; its columns are {dataset.column_names}. "
            "Pass --image-column/--label-column (or image_column/label_column) to name them."
        )


def class_names(dataset: datasets.Dataset, label_column: str = "label") -> list[str]:
    """The label names of a ``ClassLabel`` column, or the label values as strings."""
    check_columns(dataset, label_column)
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(value) for value in sorted(set(dataset[label_column]))]


def pixel_transform(
    model_name_or_path: str, image_size: int | None = None, image_column: str = "image", label_column: str = "label"
) -> Callable[[dict], dict]:
    """A ``Dataset.with_transform`` function giving ``pixel_values`` (the model's own image processor, or for an
    open_clip or timm model its library's transform: see :func:`~.models.image_preprocessor`) and ``label``.

    ``image_size`` resizes straight to a square of that side (no crop); ``None`` keeps the processor's defaults.
    """
    from ..models import image_preprocessor

    preprocess = image_preprocessor(model_name_or_path, image_size)
    if preprocess is not None:
        return LibraryTransform(preprocess, image_column, label_column)
    processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    return ProcessorTransform(processor, image_size, image_column, label_column)


def _column(batch: dict, name: str) -> list:
    """The images of a batch the transform receives; a missing column is named with what usually removed it."""
    if name not in batch:
        raise ResiDualInputError(
            f"The batch reaching the image transform has no {name!r} column (it has {sorted(batch)}): something "
            "dropped it first. transformers.Trainer drops the columns its model's forward does not name: pass "
            "TrainingArguments(remove_unused_columns=False)."
        )
    return batch[name]


class ProcessorTransform:
    """``pixel_values`` from a transformers image processor, and ``label``: a class, not a closure, so that a
    DataLoader worker started by ``spawn`` (the default on macOS and Windows) can unpickle it."""

    def __init__(self, processor, image_size: int | None, image_column: str, label_column: str) -> None:
        self.processor, self.image_column, self.label_column = processor, image_column, label_column
        self.overrides = (
            {"size": {"height": image_size, "width": image_size}, "do_center_crop": False} if image_size else {}
        )

    def __call__(self, batch: dict) -> dict:
        images = [image.convert("RGB") for image in _column(batch, self.image_column)]
        pixel_values = self.processor(images=images, return_tensors="pt", **self.overrides)["pixel_values"]
        return {"pixel_values": pixel_values, "label": batch[self.label_column]}


class LibraryTransform:
    """``pixel_values`` from an open_clip or timm eval transform (one PIL image to ``[3, H, W]``), and ``label``; a
    class, as :class:`ProcessorTransform`, so that a DataLoader worker started by ``spawn`` can unpickle it."""

    def __init__(self, preprocess: Callable, image_column: str, label_column: str) -> None:
        self.preprocess, self.image_column, self.label_column = preprocess, image_column, label_column

    def __call__(self, batch: dict) -> dict:
        images = _column(batch, self.image_column)
        pixel_values = torch.stack([self.preprocess(image.convert("RGB")) for image in images])
        return {"pixel_values": pixel_values, "label": batch[self.label_column]}


def prepare(
    dataset: datasets.Dataset,
    model_name_or_path: str,
    image_size: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> datasets.Dataset:
    """``dataset`` yielding ``{"pixel_values", "label"}``, converted on the fly by the model's image processor."""
    check_columns(dataset, image_column, label_column)
    return dataset.with_transform(pixel_transform(model_name_or_path, image_size, image_column, label_column))


def image_loader(dataset: Dataset, batch_size: int = 64, num_workers: int | None = None, **options) -> DataLoader:
    """A ``DataLoader`` over images from :func:`prepare` that decodes and preprocesses them in a worker process,
    in order; ``options`` go to ``DataLoader`` (e.g. ``shuffle``).

    The worker decodes while this process runs the backbone, with the same pixel values: decoding and the image
    processor (about 0.4 ms of CPU per image for Fashion-MNIST at 98 px, 1 to 2 % of a DINOv2-S forward's) then
    run beside the forward rather than before it (PyTorch gives the worker one thread). ``num_workers=None`` takes
    one worker where workers start by ``fork`` (Linux), none elsewhere: a ``spawn`` worker imports torch afresh for
    every loader, and needs a picklable transform. The page faults that made decoding costly in the backbone's
    process were glibc's, and :func:`~.heap.keep_freed_memory` removes them.

    Example:
        >>> units = collect_units(model, image_loader(prepare(images, "facebook/dinov2-small", 98)))
    """
    if num_workers is None:
        default = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
        num_workers = 1 if default == "fork" else 0
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **options)


def sample(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """``size`` rows drawn with ``seed`` (all rows, shuffled, if ``size`` is None or larger)."""
    if size is not None and size < 1:
        raise ResiDualInputError(f"The sample size must be at least 1, got {size}.")
    shuffled = dataset.shuffle(seed=seed)
    return shuffled if size is None or size >= len(shuffled) else shuffled.select(range(size))


def holdout(dataset: datasets.Dataset, fraction: float = 0.1) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, val)``: the first ``fraction`` of ``dataset`` (at least one image) validates, the rest trains.

    Used on a seeded draw (see :func:`sample`), so the split is random but shared by every method.
    """
    if not 0.0 < fraction < 1.0:
        raise ResiDualInputError(f"The validation fraction must be in (0, 1), got {fraction}.")
    if len(dataset) < 2:
        raise ResiDualInputError(f"Holding out validation images needs at least 2 images, got {len(dataset)}.")
    n_val = min(len(dataset) - 1, max(1, round(fraction * len(dataset))))
    return dataset.select(range(n_val, len(dataset))), dataset.select(range(n_val))


def stratified_split(
    dataset: datasets.Dataset, fraction: float, seed: int, label_column: str = "label"
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off ``fraction`` of ``dataset`` for validation, stratified by label, with ``datasets``' own split."""
    if not isinstance(dataset, datasets.Dataset):
        raise ResiDualInputError(
            f"The automatic validation split needs a datasets.Dataset, got {type(dataset).__name__}; "
            "pass eval_dataset yourself."
        )
    if len(dataset) < 2:
        raise ResiDualInputError(f"train_dataset has {len(dataset)} image(s); training needs at least 2.")
    if label_column not in dataset.column_names:
        raise ResiDualInputError(f"No label column {label_column!r}; the dataset has {dataset.column_names}.")
    if not isinstance(dataset.features[label_column], datasets.ClassLabel):
        num_classes = max(dataset.with_format(None)[label_column]) + 1
        dataset = dataset.cast_column(label_column, datasets.ClassLabel(num_classes=num_classes))
    parts = dataset.train_test_split(test_size=fraction, stratify_by_column=label_column, seed=seed)
    return parts["train"], parts["test"]


def raw_labels(dataset: Dataset, label_column: str = "label") -> torch.Tensor | None:
    """The label column of a ``datasets.Dataset`` without running its image transform; None if not at hand."""
    if isinstance(dataset, UnitStore):
        return dataset.labels
    if isinstance(dataset, datasets.Dataset) and label_column in dataset.column_names:
        return torch.as_tensor(dataset.with_format(None)[label_column])
    return None


def check_dataset(dataset: Dataset, name: str, label_column: str, num_classes: int) -> None:
    """Refuse, before any encoding, an empty data set or labels outside the classifier's classes."""
    if len(dataset) == 0:
        raise ResiDualInputError(f"{name} is empty; give it labelled images.")
    labels = raw_labels(dataset, label_column)
    if labels is not None:
        check_labels(labels, num_classes, name)


def dataset_identity(dataset: Dataset, label_column: str = "label") -> dict[str, str]:
    """Short hashes of a data set's images and of all its labels, so that a run can tell which of the two changed.

    A ``datasets.Dataset`` is identified by its own fingerprint (which every ``map``, ``select``, ``cast`` or new
    table changes, so a relabelled copy differs in both parts) and a hash of its whole label column; a
    :class:`UnitStore` by a hash of every stored piece and label; any other data set by a hash of every example,
    which reads it once (no backbone)."""
    if isinstance(dataset, UnitStore):
        return dataset.identity()
    labels = raw_labels(dataset, label_column)
    if isinstance(dataset, datasets.Dataset) and labels is not None:
        return {"images": dataset._fingerprint, "labels": content_hash(labels)}
    logger.info("Hashing the %d examples of a %s to identify the run (one read, no backbone)", len(dataset),
                type(dataset).__name__)  # fmt: skip
    images, every_label = hashlib.blake2b(digest_size=8), []
    for index in range(len(dataset)):
        example = dataset[index]
        images.update(content_hash(torch.as_tensor(example["pixel_values"])).encode())
        every_label.append(int(example[label_column]))
    return {"images": images.hexdigest(), "labels": content_hash(torch.tensor(every_label))}
