"""One runner per benchmarked method. Each returns a flat record of what it measured."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from peft_residual import (
    Architecture,
    Classifier,
    LinearClassifier,
    ResiDualConfig,
    UnitStore,
    accuracy,
    adapted_embeddings,
    embed_images,
    encode_dataset,
    epoch_seed,
    fit_residual_bases,
    train_residual,
)
from peft_residual import load_vision_model as load_backbone
from peft_residual.training.trainer import HEAD_LR

from .baselines import LEARNING_RATES, train_parameters
from .measure import PeakRSS, latency_ms, readout_products_seconds, saved_bytes, test_accuracy


@dataclass
class Bench:
    """Everything the methods share: model, splits, classifier and the training recipe."""

    model_path: str
    train: object
    val: object
    test: object
    classifier: Classifier
    batch_size: int = 64
    max_epochs: int = 30
    patience: int = 5
    workers: int = 0
    progress: bool = True
    basis_dtype: str = "float32"
    head_lr: float = HEAD_LR
    """The linear head's rate in the ``+head`` ResiDual methods (``train_residual(..., head_lr=)``)."""
    units: dict[str, UnitStore] | None = None
    """Per split, the raw unit pieces from the one backbone pass each split gets (see run.build)."""
    encode_seconds: dict[str, float] | None = None
    """Per split, the wall time of its unit pass (loading included)."""
    frozen_seconds: dict[str, float] | None = None
    """Per charged split, the wall time of a plain frozen forward over it (loading included), timed alongside."""

    def loader(self, dataset, shuffle_seed: int | None = None) -> DataLoader:
        generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle_seed is not None,
            generator=generator,
            num_workers=self.workers,
        )

    def latency(self, model: nn.Module, head=None) -> float:
        """Median ms to classify 32 test images with ``model`` and ``head`` (default: the shared classifier)."""
        pixel_values = next(iter(DataLoader(self.test, batch_size=32)))["pixel_values"]
        return latency_ms(model, pixel_values, head if head is not None else self.classifier)


CHARGED_SPLITS = ("train", "val")


def encoding_seconds(bench: Bench, backbone_pass: str) -> float:
    """The one accounting rule for backbone passes run before training: a method pays for the pass it needs over
    the images it learns from (train and validation, :data:`CHARGED_SPLITS`), and nobody pays for encoding the
    test set, which only scores it. ``"units"``: the unit pass that cached ResiDual trains on; ``"frozen"``: the
    plain frozen forward that the linear probe trains on. Methods that run the backbone while training (LoRA, full
    fine-tuning, end-to-end ResiDual) pay for it in their training time instead. The zero-shot classifier's
    centroids are shared by every method and charged to none."""
    seconds = {"units": bench.encode_seconds, "frozen": bench.frozen_seconds}[backbone_pass]
    return sum(seconds[split] for split in CHARGED_SPLITS)


def _record(method: str, seed: int, **fields) -> dict:
    return {"method": method, "seed": seed, **fields}


def zero_shot(bench: Bench, seed: int, features: dict) -> dict:
    """The frozen classifier on the base model's test embeddings (from the test split's single backbone pass)."""
    model = load_backbone(bench.model_path)
    with PeakRSS() as rss, torch.no_grad():
        score = accuracy(bench.classifier(features["test"][0]), features["test"][1])
    return _record(
        "zero-shot", seed, test_accuracy=score, trainable_params=0, adapter_bytes=0, epochs=0,
        seconds={"pca": 0.0, "cache": 0.0, "train": 0.0}, peak_rss_mib=rss.mib,
        latency_ms=bench.latency(model),
    )  # fmt: skip


HEAD_SUFFIX = "+head"
"""A method name ending in this trains a linear head together with the adapter (``residual+head``, ``lora+head``)."""


def _with_head_bytes(save, head: LinearClassifier | None):
    """``save`` (a ``save(directory)``), also writing ``head``'s weights beside the adapter when there is one."""

    def save_both(directory):
        save(directory)
        if head is not None:
            tensors = {name: p.detach().contiguous() for name, p in head.named_parameters()}
            save_file(tensors, directory / "head.safetensors")

    return save_both


def _head_params(head: LinearClassifier | None) -> int:
    return sum(p.numel() for p in head.parameters()) if head is not None else 0


def residual(
    bench: Bench,
    seed: int,
    method: str,
    end_to_end: bool = False,
    lr: float | str = 0.8,
    fit_on: UnitStore | None = None,
    head: str | None = None,
    **config_overrides,
) -> dict:
    """Fit, train and score one ResiDual variant. By default on the splits' stored units: no backbone pass here,
    and the run is charged the encoding of its train and validation images. ``end_to_end`` runs the backbone for
    the fit and at every training step instead. ``fit_on`` fits the bases on other stored units (another data
    set's); ``config_overrides`` change the preset's config. ``head="linear"`` trains a linear head together with
    the scales, on the same cache (``train_residual(..., head="linear")``), scores that head and records the run as
    ``<method>+head``; its weights count in the trainable parameters and the adapter bytes."""
    config = ResiDualConfig.preset(method, seed=seed, basis_dtype=bench.basis_dtype, **config_overrides)
    model = get_peft_model(load_backbone(bench.model_path), config)
    train, val = (bench.train, bench.val) if end_to_end else (bench.units["train"], bench.units["val"])
    encoding = 0.0 if end_to_end else encoding_seconds(bench, "units")
    with PeakRSS() as rss:
        started = time.perf_counter()
        reference = bench.loader(bench.train) if end_to_end else train if fit_on is None else fit_on
        fitted = fit_residual_bases(model, reference, progress=bench.progress)
        pca_seconds = time.perf_counter() - started
        result = train_residual(
            model, bench.classifier, train, val, batch_size=bench.batch_size, max_epochs=bench.max_epochs,
            patience=bench.patience, seed=seed, cache=not end_to_end, num_workers=bench.workers,
            progress=bench.progress, lr=lr, head=head, head_lr=bench.head_lr,
        )  # fmt: skip
    classifier = result.head if result.head is not None else bench.classifier
    if end_to_end:
        score = test_accuracy(model, classifier, bench.test, bench.batch_size, bench.workers)
    else:
        test = encode_dataset(model, bench.units["test"], progress=False)
        with torch.no_grad():
            score = accuracy(classifier(adapted_embeddings(model, test)), test.labels)
    size = saved_bytes(_with_head_bytes(model.save_pretrained, result.head))
    components = len(model.base_model.readout.lambdas(model.active_adapter))
    floor = None
    if not end_to_end:  # what the one backbone pass and the epochs' readout products alone take, and nothing else
        sizes = [[len(batch) for batch in torch.arange(len(split)).split(bench.batch_size)] for split in (train, val)]
        dim = model.base_model.arch.output_dim
        floor = encoding + readout_products_seconds(components, dim, *sizes, result.epochs_run)
    cache_seconds = result.seconds["cache"]
    train_seconds = result.seconds["total"] - cache_seconds  # all the rest: setup, any LR range test, the epochs
    return _record(
        method + (HEAD_SUFFIX if result.head is not None else ""), seed, test_accuracy=score,
        val_accuracy=result.best_val_accuracy,
        trainable_params=model.get_nb_trainable_parameters()[0] + _head_params(result.head), adapter_bytes=size,
        epochs=result.epochs_run,
        seconds={"pca": pca_seconds, "cache": encoding + cache_seconds, "train": train_seconds},
        eigen_seconds=fitted.eigen_seconds, peak_rss_mib=rss.mib, latency_ms=bench.latency(model, result.head),
        lr=result.lr, cached=result.cached, components=components,
        floor_seconds=floor, **({"head_lr": bench.head_lr} if result.head is not None else {}),
    )  # fmt: skip


def residual_seeds(bench: Bench, seeds: list[int], method: str, tags: dict, **options) -> list[dict]:
    """:func:`residual` once per seed, each record tagged with ``tags`` and printed as it lands."""
    records = []
    for seed in seeds:
        started = time.perf_counter()
        record = {**tags, **residual(bench, seed, method, **options)}
        record["wall_s"] = time.perf_counter() - started
        records.append(record)
        label = " ".join(f"{value:>16}" for value in tags.values())
        print(f"{label} {method:>10} seed {seed}: {100 * record['test_accuracy']:.1f}%", flush=True)
    return records


def _vision_linear_names(model: nn.Module, which: str) -> str:
    """A regex for PEFT's target_modules: the attention q/v projections, or every linear layer, of the vision tower."""
    arch = Architecture(model)
    prefix = f"{arch.spec.tower}\\." if arch.spec.tower else ""
    attention_out = arch.spec.attention_out.rsplit(".", 1)[-1]
    names = ["q_proj", "v_proj"] if which == "qv" else ["q_proj", "k_proj", "v_proj", attention_out, "fc1", "fc2"]
    return rf"{prefix}.*\.({'|'.join(names)})"


def _image_batches(bench: Bench, dataset, seed: int | None):
    def batches(epoch: int = 0):
        shuffle = None if seed is None else epoch_seed(seed, epoch)
        for batch in bench.loader(dataset, shuffle):
            yield batch["pixel_values"], torch.as_tensor(batch["label"])

    return batches


def _train_backbone(
    bench: Bench, model: nn.Module, params: list[nn.Parameter], seed: int, lr: float, head: Classifier | None = None
) -> dict:
    """Train ``params`` through the backbone; the logits are ``head``'s (default: the shared frozen classifier), so a
    trainable ``head`` whose parameters are in ``params`` is trained in the same loop."""
    torch.manual_seed(seed)
    head = head if head is not None else bench.classifier
    return train_parameters(
        params,
        lambda pixel_values: head(embed_images(model, pixel_values)),
        _image_batches(bench, bench.train, seed),
        _image_batches(bench, bench.val, None),
        lr=lr,
        max_epochs=bench.max_epochs,
        patience=bench.patience,
        progress=bench.progress,
    )


def lora(bench: Bench, seed: int, which: str, features: dict | None = None) -> dict:
    """LoRA (r 8, alpha 16) on the vision tower's q,v projections (``which="qv"``) or every linear layer
    (``"all"``), under the shared frozen classifier. With ``features`` (the splits' base embeddings), PEFT's
    image-classification recipe instead, recorded as ``lora+head``: LoRA on q,v and a linear head on the pooled
    embedding trained in the same loop (the bare backbone has no ``classifier`` for ``modules_to_save``). The head
    starts where residual+head's does, :meth:`LinearClassifier.from_classifier` of the frozen classifier at the
    starting embeddings' mean norm (LoRA starts as the identity, so those are the base model's), and trains at
    :data:`HEAD_LR`, residual+head's head rate (equal to LoRA's)."""
    torch.manual_seed(seed)
    base = load_backbone(bench.model_path)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=_vision_linear_names(base, which))
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    head = None
    if features is not None:
        head = LinearClassifier.from_classifier(bench.classifier, features["train"][0])
        params += list(head.parameters())
    with PeakRSS() as rss:
        result = _train_backbone(bench, model, params, seed, LEARNING_RATES["lora"], head)
    model.eval()
    classifier = head if head is not None else bench.classifier
    accuracy = test_accuracy(model, classifier, bench.test, bench.batch_size, bench.workers)
    size = saved_bytes(_with_head_bytes(model.save_pretrained, head))
    return _record(
        f"lora-{which}" if head is None else f"lora{HEAD_SUFFIX}", seed, test_accuracy=accuracy,
        val_accuracy=result["best_val_accuracy"], trainable_params=sum(p.numel() for p in params),
        adapter_bytes=size, epochs=result["epochs_run"],
        seconds={"pca": 0.0, "cache": 0.0, "train": result["train_seconds"]}, peak_rss_mib=rss.mib,
        latency_ms=bench.latency(model, head), lr=LEARNING_RATES["lora"],
        **({"head_lr": LEARNING_RATES["lora"]} if head is not None else {}),
    )  # fmt: skip


def linear_probe(bench: Bench, seed: int, features: dict) -> dict:
    """A trainable linear head on the base model's pooled features, started from the frozen classifier."""
    torch.manual_seed(seed)
    weight = nn.Parameter(bench.classifier.weights.clone())
    bias = nn.Parameter(torch.zeros(len(weight)))
    scale = bench.classifier.scale

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return scale * torch.nn.functional.normalize(x, dim=-1) @ weight.T + bias

    def batches_of(split: str, shuffle: bool):
        x, y = features[split]

        def batches(epoch: int = 0):
            order = (
                torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
                if shuffle
                else torch.arange(len(y))
            )
            for chunk in order.split(bench.batch_size):
                yield x[chunk], y[chunk]

        return batches

    with PeakRSS() as rss:
        result = train_parameters(
            [weight, bias], logits_of, batches_of("train", True), batches_of("val", False),
            lr=LEARNING_RATES["linear_probe"], max_epochs=bench.max_epochs, patience=bench.patience,
            progress=bench.progress,
        )  # fmt: skip
    x, y = features["test"]
    with torch.no_grad():
        accuracy = float((logits_of(x).argmax(-1) == y).float().mean())
    size = saved_bytes(lambda d: save_file({"weight": weight.detach(), "bias": bias.detach()}, d / "probe.safetensors"))
    return _record(
        "linear-probe", seed, test_accuracy=accuracy, val_accuracy=result["best_val_accuracy"],
        trainable_params=weight.numel() + bias.numel(), adapter_bytes=size, epochs=result["epochs_run"],
        seconds={"pca": 0.0, "cache": encoding_seconds(bench, "frozen"), "train": result["train_seconds"]},
        peak_rss_mib=rss.mib, latency_ms=bench.latency(load_backbone(bench.model_path), logits_of),
        lr=LEARNING_RATES["linear_probe"],
    )  # fmt: skip


def full_finetune(bench: Bench, seed: int) -> dict:
    """All vision-tower weights trained (the text tower and the classifier stay frozen)."""
    torch.manual_seed(seed)
    model = load_backbone(bench.model_path)
    tower = Architecture(model).tower
    for param in model.parameters():
        param.requires_grad_(False)
    params = [p for p in tower.parameters()]
    for param in params:
        param.requires_grad_(True)
    with PeakRSS() as rss:
        result = _train_backbone(bench, model, params, seed, LEARNING_RATES["full_finetune"])
    accuracy = test_accuracy(model, bench.classifier, bench.test, bench.batch_size, bench.workers)
    weights = {name: param.detach().contiguous() for name, param in tower.named_parameters()}
    size = saved_bytes(lambda d: save_file(weights, d / "tower.safetensors"))
    return _record(
        "full-finetune", seed, test_accuracy=accuracy, val_accuracy=result["best_val_accuracy"],
        trainable_params=sum(p.numel() for p in params), adapter_bytes=size, epochs=result["epochs_run"],
        seconds={"pca": 0.0, "cache": 0.0, "train": result["train_seconds"]}, peak_rss_mib=rss.mib,
        latency_ms=bench.latency(model), lr=LEARNING_RATES["full_finetune"],
    )  # fmt: skip
