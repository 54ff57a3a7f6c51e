"""Data intake: image data sets (load, sample, split, pixel transform), stores of recorded unit pieces, and loading
a supported model."""

from ..models import load_vision_model
from .heap import keep_freed_memory
from .images import (
    as_image_classification,
    check_columns,
    check_dataset,
    class_names,
    dataset_identity,
    holdout,
    image_loader,
    load_image_dataset,
    pixel_transform,
    prepare,
    raw_labels,
    sample,
    stratified_split,
)
from .units import ShardLayout, UnitStore, base_embeddings, collect_units, fit_residual_bases

__all__ = [
    "ShardLayout",
    "UnitStore",
    "as_image_classification",
    "base_embeddings",
    "check_columns",
    "check_dataset",
    "class_names",
    "collect_units",
    "dataset_identity",
    "fit_residual_bases",
    "holdout",
    "image_loader",
    "keep_freed_memory",
    "load_image_dataset",
    "load_vision_model",
    "pixel_transform",
    "prepare",
    "raw_labels",
    "sample",
    "stratified_split",
]
