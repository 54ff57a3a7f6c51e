"""PEFT's image-classification recipe with ResiDual: ``ViTForImageClassification`` and
``Dinov2ForImageClassification`` bases (directly and through ``AutoModelForImageClassification``), their classifier
in ``modules_to_save``, a linear head trained with the scales on the unit cache, and ``transformers.Trainer``
through the backbone. ``CLIPForImageClassification`` and unregistered heads are refused with the reason."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForImageClassification,
    CLIPConfig,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
)

from peft_residual import (
    CentroidClassifier,
    Classifier,
    LinearClassifier,
    ResiDualConfig,
    ResiDualInputError,
    collect_units,
    default_classifier,
    embed_images,
    fit_residual_bases,
    train_residual,
)

from .conftest import VISION, image_dataset, images, loader
from .testing_utils import reference_float64, run_main

TOWER = {k: v for k, v in VISION.items() if k != "projection_dim"}
CLASSES = ["a", "b", "c", "d"]


def config_of(kind: str):
    if kind == "vit":
        return ViTConfig(**TOWER, num_labels=len(CLASSES))
    return Dinov2Config(**TOWER, num_labels=len(CLASSES), layerscale_value=0.7)


def classifier_model(kind: str, seed: int = 0, auto: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = config_of(kind)
    if auto:
        return AutoModelForImageClassification.from_config(config).eval()
    return (ViTForImageClassification if kind == "vit" else Dinov2ForImageClassification)(config).eval()


def tower_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.vit if isinstance(model, ViTForImageClassification) else model.dinov2


def peft_classifier(kind: str, **config) -> PeftModel:
    model = get_peft_model(classifier_model(kind), ResiDualConfig(k=4, **config))
    fit_residual_bases(model, loader(), progress=False)
    return model


def learnable_units(model: PeftModel):
    train = collect_units(model, DataLoader(image_dataset(128, learnable=True), batch_size=32), progress=False)
    val = collect_units(model, DataLoader(image_dataset(64, seed=5, learnable=True), batch_size=32), progress=False)
    return train, val


@pytest.mark.parametrize("auto", [False, True], ids=["class", "auto"])
@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_image_classifiers_adapt_exactly_what_their_head_reads(kind, auto):
    base = classifier_model(kind, auto=auto)
    bare = copy.deepcopy(base)
    model = get_peft_model(base, ResiDualConfig(k=4))
    fit_residual_bases(model, loader(), progress=False)
    # the oracle: the float64 recomputation of ResiDual on the tower alone, fitted on the same images
    tower = get_peft_model(copy.deepcopy(tower_of(bare)), ResiDualConfig(k=4))
    fit_residual_bases(tower, loader(), progress=False)
    x = images(6, seed=9)
    expected = reference_float64(tower, x).float()
    with torch.no_grad():
        adapted = embed_images(model, x)
        logits = model(pixel_values=x).logits
        base_sequence = tower_of(bare)(pixel_values=x).last_hidden_state
        base_logits = bare(pixel_values=x).logits
        with model.disable_adapter():
            disabled = model(pixel_values=x).logits
    torch.testing.assert_close(adapted, expected, atol=1e-4, rtol=1e-4)
    assert (adapted - base_sequence[:, 0]).abs().max() > 1e-2  # λ₀ = 1 + N(0, 1): the embedding moved
    # ViT's head reads the normed CLS token; DINOv2's [adapted CLS, the base model's mean of the normed patch tokens]
    reads = expected if kind == "vit" else torch.cat([expected, base_sequence[:, 1:].mean(1)], dim=1)
    by_hand = bare.classifier(reads)
    torch.testing.assert_close(logits, by_hand, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(disabled, base_logits)


@pytest.mark.parametrize("auto", [False, True], ids=["class", "auto"])
def test_clip_image_classifier_is_refused_with_the_reason(auto):
    config = CLIPConfig(vision_config=VISION)
    from transformers import CLIPForImageClassification

    model = AutoModelForImageClassification.from_config(config) if auto else CLIPForImageClassification(config)
    with pytest.raises(ResiDualInputError, match=r"CLIPForImageClassification.*mean of the patch tokens.*CLIPVision"):
        get_peft_model(model, ResiDualConfig(k=4))


def test_a_head_around_a_supported_model_is_refused_unless_registered():
    with pytest.raises(ResiDualInputError, match=r"does not support ViTForMaskedImageModeling: it holds a ViTModel at"):
        get_peft_model(ViTForMaskedImageModeling(ViTConfig(**TOWER)), ResiDualConfig(k=4))

    class MyHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Dinov2Model(config_of("dinov2"))
            self.head = torch.nn.Linear(TOWER["hidden_size"], 3)

    with pytest.raises(ResiDualInputError, match=r"MyHead.*'backbone'.*model\.backbone.*register_model"):
        get_peft_model(MyHead(), ResiDualConfig(k=4))


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_modules_to_save_classifier_is_trained_counted_saved_and_loaded_back(kind, tmp_path):
    model = peft_classifier(kind, modules_to_save=["classifier"])
    copy_ = model.base_model.model.classifier.modules_to_save["default"]
    original = model.base_model.model.classifier.original_module.weight.detach().clone()
    scales = [p for name, p in model.named_parameters() if "residual_lambda" in name]
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in scales) + sum(p.numel() for p in copy_.parameters())
    before = [p.detach().clone() for p in scales] + [copy_.weight.detach().clone()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, labels = images(16, seed=4), torch.arange(16) % len(CLASSES)
    for _ in range(3):  # through the backbone, as any PEFT loop trains
        loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = [p.detach() for p in scales] + [copy_.weight.detach()]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert torch.equal(model.base_model.model.classifier.original_module.weight, original)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.classifier.weight"], copy_.weight.detach())
    loaded = PeftModel.from_pretrained(classifier_model(kind), tmp_path)
    x = images(5, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_train_residual_trains_the_scales_and_the_classifier_on_the_cache(kind, tmp_path):
    model = get_peft_model(classifier_model(kind), ResiDualConfig(k=4, modules_to_save=["classifier"]))
    train, val = learnable_units(model)
    fit_residual_bases(model, train, progress=False)
    centroids = default_classifier(model, CLASSES, kind="centroid", train_units=train)
    scales_before = torch.cat([s.detach().clone() for s in model.base_model.readout.scales("default")])
    result = train_residual(model, centroids, train, val, max_epochs=4, progress=False)
    head = result.head
    assert isinstance(head, LinearClassifier) and result.cached
    assert not torch.equal(torch.cat([s.detach() for s in model.base_model.readout.scales("default")]), scales_before)
    copy_ = model.base_model.model.classifier.modules_to_save["default"]
    hidden = TOWER["hidden_size"]
    torch.testing.assert_close(copy_.weight[:, :hidden], head.weight)
    torch.testing.assert_close(copy_.bias, head.bias)
    if kind == "dinov2":  # the cache holds the CLS units only: the patch-mean half of the head is zero
        assert torch.equal(copy_.weight[:, hidden:], torch.zeros_like(copy_.weight[:, hidden:]))
    # the trained head moved from where it started, the centroids' logits as a linear map
    with torch.no_grad():
        x = images(8, seed=11)
        adapted = embed_images(model, x)
        logits = model(pixel_values=x).logits
    torch.testing.assert_close(logits, head(adapted), atol=1e-5, rtol=1e-5)  # classifier(adapted) by hand
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(classifier_model(kind), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, logits, atol=0, rtol=0)
    assert model.peft_config["default"].training_summary["head"] == "linear"


def test_a_linear_head_on_a_bare_backbone_is_returned_saved_and_loaded(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Dinov2Model(config_of("dinov2")).eval(), ResiDualConfig(k=4))
    train, val = learnable_units(model)
    fit_residual_bases(model, train, progress=False)
    centroids = default_classifier(model, CLASSES, kind="centroid", train_units=train)
    frozen = train_residual(copy.deepcopy(model), centroids, train, val, max_epochs=4, progress=False)
    result = train_residual(model, centroids, train, val, max_epochs=4, progress=False, head="linear")
    assert frozen.head is None and result.head is not None
    assert result.best_val_accuracy >= frozen.best_val_accuracy  # strictly more expressive, from the same start
    result.head.save_pretrained(tmp_path / "classifier")
    loaded = Classifier.from_pretrained(tmp_path / "classifier")
    assert isinstance(loaded, LinearClassifier) and loaded.class_names == CLASSES
    with torch.no_grad():
        adapted = embed_images(model, images(8, seed=2))
        torch.testing.assert_close(loaded(adapted), result.head(adapted), atol=0, rtol=0)


def test_a_linear_head_starts_at_the_frozen_heads_logits():
    centroids = CentroidClassifier.from_features(torch.randn(40, 16), torch.arange(40) % 4, CLASSES, scale=30.0)
    features = F.normalize(torch.randn(10, 16), dim=-1) * 7.0  # all of norm 7
    head = LinearClassifier.from_classifier(centroids, features)
    torch.testing.assert_close(head(features), centroids(features))
    assert torch.equal(head.bias, torch.zeros(4))
    again = LinearClassifier.from_classifier(head, 123.0)  # a linear head is copied as it is
    assert torch.equal(again.weight, head.weight) and again.weight is not head.weight


def test_train_residual_resumes_a_run_with_a_head_as_if_uninterrupted(tmp_path):
    def trained(output_dir=None, stop_at=None):
        torch.manual_seed(0)
        model = get_peft_model(Dinov2Model(config_of("dinov2")).eval(), ResiDualConfig(k=4))
        train, val = learnable_units(model)
        fit_residual_bases(model, train, progress=False)
        centroids = default_classifier(model, CLASSES, kind="centroid", train_units=train)

        def stop(record):
            if record["epoch"] == stop_at:
                raise KeyboardInterrupt

        result = train_residual(
            model, centroids, train, val, max_epochs=4, patience=10, progress=False, head="linear",
            output_dir=output_dir, on_epoch_end=stop,
        )  # fmt: skip
        return torch.cat([s.detach() for s in model.base_model.readout.scales("default")]), result.head

    scales, head = trained()
    with pytest.raises(KeyboardInterrupt):
        trained(tmp_path, stop_at=2)
    resumed_scales, resumed_head = trained(tmp_path)
    torch.testing.assert_close(resumed_scales, scales, atol=0, rtol=0)
    torch.testing.assert_close(resumed_head.weight, head.weight, atol=0, rtol=0)
    torch.testing.assert_close(resumed_head.bias, head.bias, atol=0, rtol=0)


def test_the_cached_trainer_refuses_what_it_cannot_train():
    model = peft_classifier("vit", modules_to_save=["classifier"])
    centroids = CentroidClassifier.from_features(torch.randn(8, TOWER["hidden_size"]), torch.arange(8) % 4, CLASSES)
    data = image_dataset(16), image_dataset(8)
    with pytest.raises(ResiDualInputError, match=r"head='frozen' keeps it"):
        train_residual(model, centroids, *data, head="frozen", progress=False)
    three = CentroidClassifier.from_features(torch.randn(6, TOWER["hidden_size"]), torch.arange(6) % 3, CLASSES[:3])
    with pytest.raises(ResiDualInputError, match=r"classifier is \(4, 32\).*num_labels=3"):
        train_residual(model, three, *data, progress=False)
    with pytest.raises(ResiDualInputError, match=r"head must be one of"):
        train_residual(peft_classifier("vit"), centroids, *data, head="mlp", progress=False)


def test_cli_train_head_linear_saves_the_trained_head_with_the_adapter(tiny_assets, tmp_path, capfd):
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"]]
    out = tmp_path / "trained"
    code, _, err = run_main(capfd, "train", *source, "--epochs", "2", "--head", "linear", "--output", out)
    assert code == 0, err
    meta = json.loads((out / "classifier" / "classifier.json").read_text())
    assert meta["kind"] == "linear"
    assert json.loads((out / "training.json").read_text())["head"] == "linear"
    code, printed, err = run_main(capfd, "eval", *source, "--adapter", out)
    assert code == 0 and "linear head" in printed, err


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_transformers_trainer_trains_scales_and_head_through_the_backbone(kind, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = peft_classifier(kind, modules_to_save=["classifier"])
    data = image_dataset(64, learnable=True)

    def compute_metrics(prediction):  # evaluate.load("accuracy") needs the Hub: accuracy with numpy
        logits, labels = prediction
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=32, max_steps=8,
        learning_rate=3e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    scales = [p for name, p in model.named_parameters() if "residual_lambda" in name]
    before = [p.detach().clone() for p in scales]
    head_before = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, scales, strict=True))
    assert not torch.equal(head_before, model.base_model.model.classifier.modules_to_save["default"].weight)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad and "residual" not in name]
    assert frozen and all("modules_to_save" not in name for name in frozen)  # the backbone stays frozen


@pytest.mark.parametrize("cached", [False, True], ids=["trainer", "cached"])
def test_trainer_example_runs_end_to_end(tiny_assets, tmp_path, cached):
    command = [
        sys.executable, "examples/trainer_image_classification.py", "--model", tiny_assets["dinov2"],
        "--dataset", tiny_assets["dataset"], "--train-samples", "64", "--test-samples", "16", "--epochs", "1",
        "--batch-size", "16", "--output", tmp_path, *(["--cached"] if cached else []),
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    how = "train_residual on the cache" if cached else "Trainer through the backbone"
    assert f"{how}: 1 epochs in" in result.stdout and "same predictions: True" in result.stdout, result.stdout
    assert "LOAD REPORT" not in result.stdout + result.stderr  # the new head's missing weights are the point here
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in saved and any("residual_lambda" in key for key in saved)


def test_a_batch_whose_image_column_was_dropped_names_trainer_s_setting(tiny_assets):
    from peft_residual.data import pixel_transform

    transform = pixel_transform(str(tiny_assets["dinov2"]))
    with pytest.raises(ResiDualInputError, match=r"no 'image' column .*remove_unused_columns=False"):
        transform({"label": [0, 1]})  # what Trainer passes on with remove_unused_columns=True
