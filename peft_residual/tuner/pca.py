"""Streaming per-unit PCA of the direct contributions, split as PEFT's EVA splits its initialisation: computing the
bases (:func:`get_residual_bases`) apart from storing them (:func:`apply_residual_bases`);
``peft_residual.fit_residual_bases`` does both."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import warn_caller
from ..models import Architecture
from ..moments import StreamingMoments
from ..packing import canonical_signs, pack_orthonormal
from ..recording import RecordedBatch, recorded_batches
from .config import ResiDualConfig, ResiDualInputError
from .decomposition import contributions
from .layer import ResiDualUnitLayer, active_adapter
from .model import ResiDualModel, residual_tuner

logger = logging.getLogger(__name__)


@dataclass
class FitReport:
    """What :func:`fit_residual_bases` did: samples seen, components and explained variance per transformed unit."""

    num_samples: int
    components: dict[str, int] = field(default_factory=dict)
    explained_variance: dict[str, float] = field(default_factory=dict)
    clamped: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Units whose requested k exceeded their rank: name -> (requested, used)."""
    units: Any = None
    """What the caller kept of the recorded batches (a ``UnitStore`` with ``fit_residual_bases(keep_units=True)``)."""
    eigen_seconds: float = 0.0
    """Wall time of the eigendecompositions and basis building."""
    flat: list[str] = field(default_factory=list)
    """Transformed units with (about) zero variance over the reference images: nothing to fit."""
    undersampled: list[str] = field(default_factory=list)
    """Units taking a variance ratio or all components whose dimension exceeds the images seen minus one."""

    @property
    def num_scales(self) -> int:
        return sum(self.components.values())

    def __repr__(self) -> str:  # the per-unit dicts run to thousands of characters: how many units each names
        counts = ", ".join(f"{name}={len(getattr(self, name))}" for name in ("flat", "undersampled", "clamped"))
        return (
            f"FitReport(num_samples={self.num_samples}, units={len(self.components)}, num_scales={self.num_scales}, "
            f"{counts})"
        )


def choose_components(eigenvalues: torch.Tensor, k: int | float | None, max_rank: int) -> int:
    """Components to keep for descending ``eigenvalues``: all (``None``), a count, or a variance ratio."""
    if k is None:
        return max_rank
    if isinstance(k, float):
        ratios = torch.cumsum(eigenvalues, 0) / eigenvalues.sum().clamp_min(torch.finfo(eigenvalues.dtype).tiny)
        return min(int(torch.searchsorted(ratios, torch.tensor(k, dtype=ratios.dtype))) + 1, max_rank)
    return min(k, max_rank)


def _initial_lambdas(init: str, eigenvalues: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if init == "ones":
        return torch.ones(len(eigenvalues))
    if init == "randn":
        return 1.0 + torch.randn(len(eigenvalues), generator=generator)
    return (eigenvalues / eigenvalues.mean().clamp_min(torch.finfo(eigenvalues.dtype).tiny)).float()


class ResiDualBases(NamedTuple):
    """The bases fitted for one adapter, apart from any model (:func:`get_residual_bases`)."""

    adapter_name: str
    state_dict: dict[str, torch.Tensor]
    """``"<unit module path>.<name>"`` per ``ResiDualUnitLayer.stored_names`` a unit module holds, as the adapter's
    checkpoint stores them."""
    image_size: tuple[int, int]
    report: FitReport


def _layers(tuner: ResiDualModel, adapter_name: str) -> dict[str, ResiDualUnitLayer]:
    """The unit layers taking part in ``adapter_name``, by module path, in unit order."""
    paths = {id(module): path for path, module in tuner.model.named_modules()}
    return {paths[id(layer)]: layer for layer in tuner.readout.layers_of(adapter_name)}


@torch.no_grad()
def get_residual_bases(
    model: nn.Module,
    dataloader: Iterable,
    adapter_name: str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    on_batch: Callable[[RecordedBatch], None] | None = None,
    merge_processes: bool = False,
) -> ResiDualBases:
    """Fit every unit's PCA basis and mean on reference images, and the initial scales, leaving ``model`` as it is.

    ``dataloader`` yields dicts with ``pixel_values`` (or tensors) of one image size, or batches recorded earlier
    (``peft_residual.recording.RecordedBatch``); ``on_batch`` sees each recorded batch. Covariances accumulate per
    unit in float64; with ``merge_processes=True`` each process of a ``torch.distributed`` group passes its share of
    the images and all fit on all of them. ``k`` is clamped to each unit's rank (``Architecture.max_rank``), which
    the :class:`FitReport` and a warning report.

    Example:
        >>> bases = get_residual_bases(peft_model, DataLoader(reference_images, batch_size=64))
        >>> apply_residual_bases(peft_model, bases)
    """
    tuner = residual_tuner(model)
    adapter_name = adapter_name or active_adapter(tuner)
    config = tuner.peft_config[adapter_name]
    layers = _layers(tuner, adapter_name)
    total = max_batches if max_batches is not None else (len(dataloader) if hasattr(dataloader, "__len__") else None)
    batches = tqdm(dataloader, desc="ResiDual PCA", total=total, disable=not progress)
    was_training = tuner.model.training
    tuner.model.eval()
    try:
        batches = islice(recorded_batches(tuner.arch, batches, "fit_residual_bases"), max_batches)
        moments, image_size = _accumulate(tuner.arch, layers.values(), adapter_name, config, batches, on_batch)
    finally:
        tuner.model.train(was_training)
    if merge_processes:
        for layer_moments in moments.values():
            layer_moments.merge_processes()
    num_samples = next(iter(moments.values())).count if moments else 0
    if num_samples < 2:
        raise ResiDualInputError(
            f"fit_residual_bases saw {num_samples} image(s); a PCA needs at least 2 (and more than k). "
            "Pass more reference images."
        )
    _refuse_constant_units(layers.values(), adapter_name, moments, num_samples)
    state_dict, report = _solve(layers, adapter_name, config, moments, progress)
    if report.flat:
        warn_caller(
            f"{len(report.flat)} unit(s) have zero variance over the reference images (e.g. {report.flat[0]}); their "
            "bases are arbitrary. See FitReport.flat."
        )
    if report.undersampled:
        largest = max(layer.max_rank(adapter_name) for layer in layers.values())
        warn_caller(
            f"{num_samples} reference images for units of up to {largest} dimensions: the PCA of the all-component "
            f"or variance-ratio units (e.g. {report.undersampled[0]}) rests on too few images. Fit on more images "
            "than that. See FitReport.undersampled."
        )
    if report.clamped:
        (name, (asked, used)), more = next(iter(report.clamped.items())), len(report.clamped) - 1
        warn_caller(
            f"k={asked} exceeds the rank of {len(report.clamped)} units (e.g. {name}: {used}); clamped to their rank. "
            f"See FitReport.clamped{f' for the other {more}' if more else ''}."
        )
    return ResiDualBases(adapter_name, state_dict, image_size, report)


@torch.no_grad()
def apply_residual_bases(model: nn.Module, bases: ResiDualBases) -> None:
    """Store ``bases`` in their adapter of ``model`` and its ``base_signature`` in the config; refitting resets the
    scales to their initial values (a warning says so if they were trained)."""
    tuner, adapter_name = residual_tuner(model), bases.adapter_name
    config, readout = tuner.peft_config[adapter_name], tuner.readout
    layers = _layers(tuner, adapter_name)
    held = {
        path: [name for name in layer.stored_names if adapter_name in getattr(layer, name)]
        for path, layer in layers.items()
    }
    if set(bases.state_dict) != {f"{path}.{name}" for path, names in held.items() for name in names}:
        raise ResiDualInputError(
            f"These bases were fitted for another model or ResiDualConfig than adapter '{adapter_name}' of this one; "
            "fit them on this model."
        )
    before = readout.lambdas(adapter_name).detach().clone() if readout.is_fitted(adapter_name) else None
    for path, layer in layers.items():
        layer.store(adapter_name, {name: bases.state_dict[f"{path}.{name}"] for name in held[path]})
    readout.refresh([adapter_name])
    after = readout.lambdas(adapter_name).detach()
    if before is not None and (config.training_summary is not None or not torch.equal(before, after.to(before))):
        # however they were changed (train_residual, a hand-written loop, a loaded adapter), they are gone now
        warn_caller(
            f"Refitting adapter '{adapter_name}' replaced scales that differed from their initial values with new "
            "initial values; train again (or fit a new adapter name to keep these)."
        )
    config.training_summary = None
    config.base_signature = tuner.arch.signature(bases.image_size)


def _is_flat(variance: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per unit, whether its total variance is zero up to float64 rounding of its mean's size."""
    return variance <= 1e-10 * (mean.square().sum(-1) + variance)


def _refuse_constant_units(
    layers: Iterable[ResiDualUnitLayer], adapter_name: str, moments: dict[int, StreamingMoments], num_samples: int
) -> None:
    """Refuse, before anything is replaced, reference images that leave every transformed unit constant."""
    transformed = [layer for layer in layers if layer.is_transformed(adapter_name)]
    for layer in transformed:
        stats = moments[id(layer)]
        variance = torch.diagonal(stats.scatter, dim1=-2, dim2=-1).sum(-1) / (stats.count - 1)
        if not bool(_is_flat(variance, stats.mean).all()):
            return
    raise ResiDualInputError(
        f"Every transformed unit has zero variance over the {num_samples} reference images: they are identical or "
        "constant. Fit on varied images."
    )


def _accumulate(
    arch: Architecture,
    layers: Iterable[ResiDualUnitLayer],
    adapter_name: str,
    config: ResiDualConfig,
    batches: Iterable[RecordedBatch],
    on_batch: Callable[[RecordedBatch], None] | None,
) -> tuple[dict[int, StreamingMoments], tuple[int, int] | None]:
    """Per layer, the streaming moments of its units over every batch (heads in head coordinates,
    :mod:`.head_space`), and the images' size."""
    moments = {id(layer): StreamingMoments(scatter=layer.is_transformed(adapter_name)) for layer in layers}
    frames = {id(layer): layer.frames(adapter_name) for layer in layers if layer.in_head_space}
    image_size = None
    for step, batch in enumerate(batches):
        if on_batch is not None:
            on_batch(batch)
        image_size = batch.image_size
        direct = contributions(batch.record, arch, config.ln_mean)
        # one reduction instead of an elementwise test: a NaN or inf anywhere makes its unit's sum non-finite, and a
        # float64 sum of float32 values cannot overflow
        per_unit = direct.sum((0, 2), dtype=torch.float64)
        if not torch.isfinite(per_unit).all():
            unit = arch.unit_names[int((~torch.isfinite(per_unit)).nonzero()[0])]
            raise ResiDualInputError(
                f"Non-finite activations in unit {unit} at batch {step}; check the inputs' normalisation and the "
                "model's dtype (fp16 can overflow: fit in float32)."
            )
        for layer in layers:
            units = direct[:, layer.unit_slice].double()
            if id(layer) in frames:
                frame, offset = frames[id(layer)].frames.to(units.device), frames[id(layer)].offset.to(units.device)
                units = torch.einsum("bno,nor->bnr", units - offset, frame)
            moments[id(layer)].update(units)
    return moments, image_size


def _solve(
    layers: dict[str, ResiDualUnitLayer],
    adapter_name: str,
    config: ResiDualConfig,
    moments: dict[int, StreamingMoments],
    progress: bool,
) -> tuple[dict[str, torch.Tensor], FitReport]:
    """Eigendecompose every transformed layer's moments: the state dict of :class:`ResiDualBases`, and the report."""
    report = FitReport(num_samples=next(iter(moments.values())).count)
    generator = torch.Generator().manual_seed(config.seed)
    transformed = [layer for layer in layers.values() if layer.is_transformed(adapter_name)]
    logger.info("Eigendecomposition of %d unit groups", len(transformed))
    basis_dtype = getattr(torch, config.basis_dtype)
    state = {}
    started = time.perf_counter()
    for path, layer in tqdm(
        layers.items(), desc="ResiDual eigendecomposition", disable=not progress or not transformed
    ):
        stats = moments[id(layer)]
        state[f"{path}.residual_mean"] = stats.mean.float()
        if not layer.is_transformed(adapter_name):
            continue
        bases, lambdas = _fit_layer(layer, adapter_name, stats, config, generator, report)
        state[f"{path}.residual_rank"] = torch.tensor([rows.shape[0] for rows in bases])
        state[f"{path}.residual_basis"] = torch.cat([pack_orthonormal(rows) for rows in bases]).to(basis_dtype)
        state[f"{path}.residual_lambda"] = torch.cat(lambdas)
    report.eigen_seconds = time.perf_counter() - started
    return state, report


def _fit_layer(
    layer: ResiDualUnitLayer,
    adapter_name: str,
    stats: StreamingMoments,
    config: ResiDualConfig,
    generator: torch.Generator,
    report: FitReport,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    eigenvalues, eigenvectors = torch.linalg.eigh(stats.covariance() if config.centre else stats.second_moment())
    eigenvalues, eigenvectors = eigenvalues.flip(-1).clamp_min(0.0), eigenvectors.flip(-1)
    max_rank = layer.max_rank(adapter_name)
    bases, lambdas = [], []
    for unit, (name, selected) in enumerate(zip(layer.unit_names, layer.selected(adapter_name), strict=True)):
        if not selected:  # a head left out by ResiDualConfig.heads: no components, handled as `rest` says
            bases.append(eigenvectors.new_zeros(0, eigenvectors.shape[1]))
            continue
        # "all components" means all the data has: a centred sample of n spans at most n - 1 directions
        rank = max_rank if config.k is not None else min(max_rank, stats.count - config.centre)
        k = choose_components(eigenvalues[unit], config.k, rank)
        if isinstance(config.k, int) and config.k > max_rank:
            report.clamped[name] = (config.k, k)
        if isinstance(config.k, int) and stats.count <= k:
            raise ResiDualInputError(
                f"Unit {name} needs {k} components but only {stats.count} samples were seen; a PCA with k components "
                f"needs more than k samples. Pass more reference images or lower k."
            )
        if bool(_is_flat(eigenvalues[unit].sum(), stats.mean[unit])):
            report.flat.append(name)
        if not isinstance(config.k, int) and stats.count - config.centre < max_rank:
            report.undersampled.append(name)
        values = eigenvalues[unit, :k]
        bases.append(canonical_signs(eigenvectors[unit, :, :k].T))
        per_unit = config.scale_per == "unit"
        lambdas.append(_initial_lambdas(config.lambda_init, values[:1] if per_unit else values, generator))
        report.components[name] = k
        total = eigenvalues[unit].sum()
        report.explained_variance[name] = float(values.sum() / total) if total > 0 else 0.0
    return bases, lambdas
