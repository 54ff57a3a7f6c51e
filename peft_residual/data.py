"""Image data sets for ResiDual: load by Hub id or local path, subsample, and turn images into ``pixel_values``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
from transformers import AutoImageProcessor


def load_image_dataset(name_or_path: str, split: str | None = None) -> datasets.Dataset | datasets.DatasetDict:
    """A ``datasets`` data set from a directory written by ``save_to_disk`` or, otherwise, from the Hub."""
    if Path(name_or_path).exists():
        dataset = datasets.load_from_disk(name_or_path)
    else:
        dataset = datasets.load_dataset(name_or_path)
    if split is None:
        return dataset
    if split not in dataset:
        raise KeyError(f"{name_or_path} has no split {split!r}; it has {list(dataset)}.")
    return dataset[split]


def check_columns(dataset: datasets.Dataset, *columns: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise KeyError(
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
    """A ``Dataset.with_transform`` function giving ``pixel_values`` (the model's own image processor) and ``label``.

    ``image_size`` resizes straight to a square of that side (no crop); ``None`` keeps the processor's defaults.
    """
    processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    overrides = {"size": {"height": image_size, "width": image_size}, "do_center_crop": False} if image_size else {}

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch[image_column]]
        pixel_values = processor(images=images, return_tensors="pt", **overrides)["pixel_values"]
        return {"pixel_values": pixel_values, "label": batch[label_column]}

    return transform


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


def sample(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """``size`` rows drawn with ``seed`` (all rows, shuffled, if ``size`` is None or larger)."""
    shuffled = dataset.shuffle(seed=seed)
    return shuffled if size is None or size >= len(shuffled) else shuffled.select(range(size))
