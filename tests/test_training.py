import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from peft_residual import (
    CentroidClassifier,
    Classifier,
    ResiDualConfig,
    ResiDualInputError,
    ScaleSet,
    ZeroShotClassifier,
    accuracy,
    collect_units,
    embed_images,
    encode_dataset,
    find_learning_rate,
    fit_residual_bases,
    load_templates,
    stratified_split,
    train_residual,
)
from peft_residual.training.checkpoint import CHECKPOINT_NAME

from .conftest import image_dataset, images, loader, make_model, model_output, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_tiny.py"


def fitted_with_classifier(kind="dinov2", config=None, n=128):
    model = get_peft_model(make_model(kind), config or ResiDualConfig(k=4, units="heads+mlps"))
    fit_residual_bases(model, loader(n=n), progress=False)
    data = image_dataset(n)
    batch = data[:]
    classifier = CentroidClassifier.from_model(model, [batch], list("abcd"), progress=False)
    return model, classifier, data


def scales(model):
    return model.base_model.readout.lambdas("default").detach().clone()


def test_shipped_templates():
    assert len(load_templates("imagenet")) == 80
    assert len(load_templates("cifar10")) == 18
    for name in ("mnist", "eurosat", "gtsrb", "dtd", "svhn", "resisc45", "sun397", "cars"):
        assert all("{}" in t for t in load_templates(name))
    assert load_templates(["a {} photo."]) == ["a {} photo."]


@pytest.mark.parametrize(
    ("templates", "error", "message"),
    [
        ("nope", ValueError, "No template set named"),
        (["a photo"], ValueError, "has no '{}'"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_templates_are_errors(templates, error, message):
    with pytest.raises(error, match=message):
        load_templates(templates)


def test_zero_shot_classifier_averages_normalised_templates():
    clip = make_model("clip")
    tokenizer = word_tokenizer()
    templates = ["a photo of the {} .", "a big {} ."]
    classifier = ZeroShotClassifier.from_clip(clip, tokenizer, ["cat", "dog", "bird"], templates=templates)
    with torch.no_grad():
        for row, name in enumerate(["cat", "dog", "bird"]):
            tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
            text = F.normalize(clip.get_text_features(**tokens).pooler_output.double(), dim=-1)
            expected = F.normalize(text.mean(0), dim=-1)
            torch.testing.assert_close(classifier.weights[row].double(), expected, rtol=1e-5, atol=1e-6)
    assert classifier.scale == pytest.approx(float(clip.logit_scale.detach().exp()))
    x = torch.randn(5, classifier.weights.shape[1])
    expected_logits = classifier.scale * F.normalize(x, dim=-1) @ classifier.weights.T
    torch.testing.assert_close(classifier(x), expected_logits)
    with pytest.raises(ValueError, match="class list is empty"):
        ZeroShotClassifier.from_clip(clip, tokenizer, [], templates=templates)


def test_blip_zero_shot_head_reads_its_contrastive_text_side():
    """BLIP retrieval: the text encoder's first token through text_proj, per template normalised, averaged; picked
    by default_classifier for a BLIP model."""
    blip = make_model("blip")
    tokenizer = word_tokenizer()
    templates = ["a photo of the {} .", "a big {} ."]
    classifier = ZeroShotClassifier.from_blip(blip, tokenizer, ["cat", "dog"], templates=templates)
    with torch.no_grad():
        for row, name in enumerate(["cat", "dog"]):
            tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
            first = blip.text_encoder(tokens["input_ids"], attention_mask=tokens["attention_mask"])[0][:, 0]
            text = F.normalize((first.double() @ blip.text_proj.weight.double().T) + blip.text_proj.bias, dim=-1)
            torch.testing.assert_close(classifier.weights[row].double(), F.normalize(text.mean(0), dim=-1))
    assert classifier.scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert classifier.weights.shape[1] == blip.config.image_text_hidden_size

    from peft_residual import default_classifier

    chosen = default_classifier(blip, ["cat", "dog"], templates=templates, tokenizer_source=None, tokenizer=tokenizer)
    assert isinstance(chosen, ZeroShotClassifier) and torch.equal(chosen.weights, classifier.weights)


def test_centroid_classifier_and_round_trip(tmp_path):
    features = torch.randn(12, 6)
    labels = torch.tensor([0, 1, 2] * 4)
    classifier = CentroidClassifier.from_features(features, labels, ["x", "y", "z"], scale=50.0)
    for c in range(3):
        expected = F.normalize(features[labels == c].mean(0), dim=-1)
        torch.testing.assert_close(classifier.weights[c], expected)
    classifier.save_pretrained(tmp_path)
    again = Classifier.from_pretrained(tmp_path)
    assert isinstance(again, CentroidClassifier) and again.scale == 50.0 and again.class_names == ["x", "y", "z"]
    assert torch.equal(again.weights, classifier.weights)
    assert {p.name for p in tmp_path.iterdir()} == {"classifier.json", "classifier.safetensors"}
    with pytest.raises(ValueError, match="Class 'w' has no examples"):
        CentroidClassifier.from_features(features, labels, ["x", "y", "z", "w"])


def test_official_centroids_average_normalised_features():
    features = torch.randn(12, 6) * torch.linspace(0.1, 10, 12)[:, None]  # norms differ, so the two forms differ
    labels = torch.tensor([0, 1, 2] * 4)
    official = CentroidClassifier.from_features(features, labels, ["x", "y", "z"], average="normalized")
    raw = CentroidClassifier.from_features(features, labels, ["x", "y", "z"])
    for c in range(3):
        expected = F.normalize(F.normalize(features[labels == c].double(), dim=-1).mean(0), dim=-1)
        torch.testing.assert_close(official.weights[c].double(), expected, rtol=1e-6, atol=1e-7)
    assert float((official.weights - raw.weights).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="average must be one of"):
        CentroidClassifier.from_features(features, labels, ["x", "y", "z"], average="median")


def test_centroids_use_the_base_model_even_when_adapted():
    model, classifier, data = fitted_with_classifier()
    with torch.no_grad(), model.disable_adapter():
        plain = embed_images(model, data[:]["pixel_values"])
    again = CentroidClassifier.from_features(plain, data[:]["label"], list("abcd"))
    torch.testing.assert_close(again.weights, classifier.weights)


def test_centroids_from_stored_units_equal_those_of_the_base_embeddings_and_hold_no_graph():
    """From a bare model, whose weights require gradients: the centroids must still be plain constants, or every
    training step would backpropagate into them."""
    model = make_model("dinov2")
    data = {"pixel_values": images(40, seed=5), "label": torch.arange(40) % 4}
    units = collect_units(model, [data], progress=False)
    from_units = CentroidClassifier.from_units(units, list("abcd"))
    with torch.no_grad():
        embeddings = embed_images(model, data["pixel_values"])
    torch.testing.assert_close(
        from_units.weights, CentroidClassifier.from_features(embeddings, data["label"], list("abcd")).weights
    )
    assert from_units.weights.grad_fn is None and not from_units.weights.requires_grad


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 0])) == 0.75
    assert math.isnan(accuracy(logits[:0], torch.tensor([], dtype=torch.long)))


def test_stratified_split_is_seeded_and_balanced():
    data = image_dataset(200)
    train, val = stratified_split(data, 0.1, seed=0)
    assert len(val) == 20 and len(train) == 180
    assert torch.bincount(val[:]["label"]).tolist() == [5, 5, 5, 5]
    assert isinstance(val[0]["pixel_values"], torch.Tensor)  # the format survives the split
    again, _ = stratified_split(data, 0.1, seed=0)
    other, _ = stratified_split(data, 0.1, seed=1)
    assert again[:]["label"].tolist() == train[:]["label"].tolist()
    assert torch.equal(again[:]["pixel_values"], train[:]["pixel_values"])
    assert not torch.equal(other[:]["pixel_values"], train[:]["pixel_values"])


def test_cached_path_matches_end_to_end():
    results = {}
    for cache in (True, False):
        model, classifier, data = fitted_with_classifier()
        result = train_residual(model, classifier, data, max_epochs=3, batch_size=16, cache=cache, progress=False)
        assert result.cached is cache
        results[cache] = (scales(model), result)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-5)
    for cached, end_to_end in zip(results[True][1].history, results[False][1].history, strict=True):
        assert cached["val_accuracy"] == end_to_end["val_accuracy"]
        assert cached["train_loss"] == pytest.approx(end_to_end["train_loss"], rel=1e-6)


def test_training_is_deterministic_and_improves_the_loss():
    runs = []
    for seed in (0, 0, 1):
        model, classifier, data = fitted_with_classifier()
        before = scales(model)
        result = train_residual(model, classifier, data, max_epochs=4, batch_size=16, seed=seed, progress=False)
        assert not torch.equal(scales(model), before)
        runs.append((scales(model), result))
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][0], runs[2][0])
    history = runs[0][1].history
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("kind", ["dinov2", "clip_vision_projection"])
def test_training_learns_a_learnable_task_beyond_zero_shot(kind):
    """Held-out accuracy of the trained scales beats the frozen classifier by at least 25 points on a task whose
    class signal hides under a class-independent nuisance (zero-shot near chance), and the scales moved."""
    model = get_peft_model(make_model(kind), ResiDualConfig.preset("residual"))
    train, val, test = (image_dataset(n, seed=seed, learnable=True) for n, seed in ((256, 1), (64, 2), (256, 3)))
    fit_residual_bases(model, DataLoader(train, batch_size=64), progress=False)
    classifier = CentroidClassifier.from_model(model, DataLoader(train, batch_size=64), list("abcd"), progress=False)
    initial = scales(model)
    with torch.no_grad(), model.disable_adapter():
        zero_shot = accuracy(classifier(embed_images(model, test[:]["pixel_values"])), test[:]["label"])
    train_residual(model, classifier, train, val, max_epochs=30, patience=5, progress=False)
    with torch.no_grad():
        trained = accuracy(classifier(embed_images(model, test[:]["pixel_values"])), test[:]["label"])
    assert zero_shot < 0.45 and trained >= zero_shot + 0.25, (zero_shot, trained)
    assert float((scales(model) - initial).abs().max()) > 0.5  # moved from λ₀ = 1 + N(0, 1), not only drawn


def test_best_epoch_is_restored_and_early_stopping_counts_patience():
    model, classifier, data = fitted_with_classifier()
    train, val = stratified_split(data, 0.25, seed=0)
    result = train_residual(model, classifier, train, val, max_epochs=30, patience=2, batch_size=16, progress=False)
    accuracies = [record["val_accuracy"] for record in result.history]
    assert result.best_val_accuracy == max(accuracies)
    assert result.best_epoch == 1 + accuracies.index(max(accuracies))
    assert result.epochs_run == len(accuracies)
    assert result.epochs_run == 30 or result.epochs_run == result.best_epoch + 2
    with torch.no_grad():
        logits = classifier(embed_images(model, val[:]["pixel_values"]))
    assert accuracy(logits, val[:]["label"]) == pytest.approx(result.best_val_accuracy)


def test_lr_range_test_leaves_scales_unchanged():
    model, classifier, data = fitted_with_classifier()
    before = scales(model)
    lr = find_learning_rate(ScaleSet(model), classifier, encode_dataset(model, data), seed=0, batch_size=16, steps=12)
    assert 1e-3 <= lr <= 10.0
    assert torch.equal(scales(model), before)
    result = train_residual(model, classifier, data, lr="auto", max_epochs=1, batch_size=16, progress=False)
    assert result.lr > 0 and result.seconds["lr_range"] > 0


def test_cache_budget_goes_to_disk_or_errors(caplog):
    model, classifier, data = fitted_with_classifier()
    with caplog.at_level(logging.INFO, logger="peft_residual.training.trainer"):
        result = train_residual(model, classifier, data, max_epochs=1, max_cache_bytes=1, progress=False)
    assert (result.cached, result.cache_location) == (True, "disk") and "keeping it on disk" in caplog.text
    with pytest.raises(MemoryError, match="cache='disk'"):
        train_residual(model, classifier, data, max_epochs=1, cache=True, max_cache_bytes=1, progress=False)
    streamed = train_residual(model, classifier, data, max_epochs=1, cache=False, progress=False)
    assert (streamed.cached, streamed.cache_location) == (False, "streamed")


def test_bad_training_arguments_are_errors():
    model, classifier, data = fitted_with_classifier()
    for lr in (-1, 0, math.nan, math.inf, True, "fast"):
        with pytest.raises(ResiDualInputError, match="lr must be"):
            train_residual(model, classifier, data, lr=lr, progress=False)
    for name in ("batch_size", "max_epochs", "patience"):
        with pytest.raises(ResiDualInputError, match=f"{name} must be a positive int"):
            train_residual(model, classifier, data, progress=False, **{name: 0})
    with pytest.raises(ValueError, match="cache must be"):
        train_residual(model, classifier, data, cache="yes", progress=False)
    with pytest.raises(ResiDualInputError, match="pass eval_dataset"):
        train_residual(model, classifier, list(data), progress=False)
    unfitted = get_peft_model(make_model("dinov2"), ResiDualConfig(k=2))
    with pytest.raises(RuntimeError, match="fit_residual_bases"):
        train_residual(unfitted, classifier, data, progress=False)


def _checkpoint_epoch(directory: Path) -> int:
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return 0
    import json

    with safe_open(path, framework="pt") as handle:
        return json.loads(handle.metadata()["state"])["epoch"]


def _run_script(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=True)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_scales(tmp_path):
    reference = tmp_path / "reference"
    _run_script("--out", str(reference), "--epochs", "6")
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "resumed"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--epochs", "6", "--checkpoint-dir", str(checkpoints)]
    process = subprocess.Popen([*command, "--sleep", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _checkpoint_epoch(checkpoints) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = _checkpoint_epoch(checkpoints)
    assert 2 <= interrupted_at < 6 and not (out / "lambdas.safetensors").exists()
    subprocess.run(command, capture_output=True, check=True)
    assert _checkpoint_epoch(checkpoints) == 6
    resumed = load_file(out / "lambdas.safetensors")["lambdas"]
    torch.testing.assert_close(resumed, load_file(reference / "lambdas.safetensors")["lambdas"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["true", "disk"], ids=["memory", "disk"])
def test_two_processes_match_one(tmp_path, cache):
    """With the disk cache, each process encodes its own batches into its own files and both train from all of
    them; either way λ equal the one-process run's (in memory) bit for bit."""
    _run_script("--out", str(tmp_path / "one"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    script = [str(SCRIPT), "--out", str(tmp_path / "two"), "--cache", cache, "--cache-dir", str(tmp_path / "cache")]
    subprocess.run([*launch, *script], capture_output=True, check=True)
    assert (tmp_path / "two" / "result.txt").read_text().split()[2] == "2"
    if cache == "disk":
        for rank in (0, 1):  # what each process encoded, all of it committed
            assert json.loads((tmp_path / "cache" / "train" / f"progress.r{rank}.json").read_text())["done"]
    saved = load_file(tmp_path / "one" / "lambdas.safetensors")
    one, initial = saved["lambdas"], saved["initial"]
    two = load_file(tmp_path / "two" / "lambdas.safetensors")["lambdas"]
    assert float((one - initial).abs().max()) > 0.1  # trained away from λ₀, so the equality below means something
    # Equal by construction: the cache is encoded in the same batches with one thread per process, and the scales
    # train in float64, where the cross-process sum's other association moves λ by ~1e-16, far below float32's ulp.
    assert torch.equal(two, one), float((two - one).abs().max())


@pytest.mark.slow
def test_two_processes_streaming_match_one_within_float32_rounding(tmp_path):
    """Streamed training shares each batch sample by sample, so the backbone runs in other batch shapes than in one
    process: λ agree to float32 rounding of the backbone, not bit for bit (docs/usage.md states this bound)."""
    _run_script("--out", str(tmp_path / "one"), "--cache", "false", "--epochs", "3")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    subprocess.run([*launch, str(SCRIPT), "--out", str(tmp_path / "two"), "--cache", "false", "--epochs", "3"],
                   capture_output=True, check=True)  # fmt: skip
    saved = load_file(tmp_path / "one" / "lambdas.safetensors")
    one, initial = saved["lambdas"], saved["initial"]
    two = load_file(tmp_path / "two" / "lambdas.safetensors")["lambdas"]
    assert float((one - initial).abs().max()) > 0.1
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_pass_sharded_across_two_processes_fits_and_trains_like_one(tmp_path):
    """``collect_units(..., accelerator=)``: each process records and keeps half the images; the fit's moments, the
    centroids and the disk cache combine the halves. Only the order of the float64 sums differs from one process,
    so bases, centroids and λ agree to float64 rounding carried through training, not bit for bit."""
    _run_script("--out", str(tmp_path / "one"), "--one-pass", "--cache", "disk")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    script = [str(SCRIPT), "--out", str(tmp_path / "two"), "--one-pass", "--cache", "disk"]
    subprocess.run([*launch, *script, "--cache-dir", str(tmp_path / "cache")], capture_output=True, check=True)
    one_epochs, _, one_world, one_held = (tmp_path / "one" / "result.txt").read_text().split()
    two_epochs, _, two_world, two_held = (tmp_path / "two" / "result.txt").read_text().split()
    assert (one_world, two_world, one_held, two_held) == ("1", "2", "192", "96")  # 192 training images, halved
    for rank in (0, 1):  # each process cached its own half
        assert json.loads((tmp_path / "cache" / "train" / f"progress.r{rank}.json").read_text())["rows"] == 96
    one, two = (load_file(tmp_path / run / "lambdas.safetensors") for run in ("one", "two"))
    torch.testing.assert_close(two["centroids"], one["centroids"], rtol=0, atol=1e-6)
    torch.testing.assert_close(two["basis"], one["basis"], rtol=0, atol=1e-5)
    assert float((one["lambdas"] - one["initial"]).abs().max()) > 0.1
    torch.testing.assert_close(two["lambdas"], one["lambdas"], rtol=0, atol=1e-4)
    assert one_epochs == two_epochs


def test_finished_checkpoint_is_reused_and_another_run_is_refused(tmp_path):
    model, classifier, data = fitted_with_classifier()
    first = train_residual(model, classifier, data, max_epochs=2, batch_size=16, output_dir=tmp_path, progress=False)
    trained = scales(model)
    again = train_residual(model, classifier, data, max_epochs=2, batch_size=16, output_dir=tmp_path, progress=False)
    assert torch.equal(scales(model), trained) and again.history == first.history and again.seconds["train"] < 1
    with pytest.raises(ValueError, match="holds the checkpoint of another run"):
        train_residual(model, classifier, data, max_epochs=2, batch_size=32, output_dir=tmp_path, progress=False)


def test_a_checkpoint_holds_the_scales_and_optimiser_state_per_layer_as_the_adapter_does(tmp_path):
    model, classifier, data = fitted_with_classifier()
    train_residual(model, classifier, data, max_epochs=3, batch_size=16, output_dir=tmp_path, progress=False)
    tensors = load_file(tmp_path / CHECKPOINT_NAME)
    layers = model.base_model.readout.transformed_layers("default")
    assert len(layers) > 1 and {key.rsplit(".", 1)[0] for key in tensors} == {
        "lambda", "best", "optimizer.z", "optimizer.exp_avg_sq"
    }  # fmt: skip
    for i, layer in enumerate(layers):
        adapter = layer.residual_lambda["default"]
        assert all(tensors[f"{name}.{i}"].shape == adapter.shape for name in ("lambda", "optimizer.z"))
        assert torch.equal(tensors[f"best.{i}"].to(adapter.dtype), adapter)  # the best epoch's scales, restored
    assert f"lambda.{len(layers)}" not in tensors


def test_a_checkpoint_of_another_run_is_refused_before_any_encoding_naming_what_differs(tmp_path, monkeypatch):
    model, classifier, data = fitted_with_classifier(n=160)
    val = image_dataset(32, seed=5)
    options = {"max_epochs": 1, "batch_size": 16, "output_dir": tmp_path, "progress": False}
    train_residual(model, classifier, data, val, **options)
    import peft_residual.training.trainer as trainer

    monkeypatch.setattr(trainer, "encode_dataset", lambda *a, **k: pytest.fail("encoded before refusing"))
    picked = {5, 17, 33, 61, 98, 120, 141}  # 7 of 160, none of them the first, middle or last
    relabelled = data.map(lambda row, i: {"label": (int(row["label"]) + 1) % 4 if i in picked else row["label"]},
                          with_indices=True)  # fmt: skip
    other_classifier = CentroidClassifier.from_features(torch.randn(8, 32), torch.arange(8) % 4, list("abcd"))
    refitted, _, _ = fitted_with_classifier(config=ResiDualConfig(k=3, units="heads+mlps"), n=160)
    cases = [
        ({"train_dataset": relabelled}, "training labels"),  # (its fingerprint, the "images" part, changes too)
        ({"train_dataset": image_dataset(160, seed=9)}, "other training images$"),
        ({"eval_dataset": image_dataset(32, seed=6)}, "other validation images$"),
        ({"classifier": other_classifier}, "other classifier$"),
        ({"model": refitted}, "other bases"),
        ({"lr": 0.5}, "other hyper-parameters: lr 0.8 saved vs 0.5 now$"),  # which ones, with both values
    ]
    for changes, differs in cases:
        arguments = {"model": model, "classifier": classifier, "train_dataset": data, "eval_dataset": val, **changes}
        with pytest.raises(ResiDualInputError, match="holds the checkpoint of another run") as refused:
            train_residual(**arguments, **options)
        assert re.search(differs, str(refused.value).split(";")[0].rstrip(")")), str(refused.value)


def test_resume_false_starts_fresh_over_another_runs_checkpoint(tmp_path):
    model, classifier, data = fitted_with_classifier()
    options = {"max_epochs": 2, "batch_size": 16, "output_dir": tmp_path, "progress": False}
    train_residual(model, classifier, data, **options)
    fresh = train_residual(model, classifier, data, lr=0.5, resume=False, **options)
    assert fresh.lr == 0.5 and len(fresh.history) == 2
    again = train_residual(model, classifier, data, lr=0.5, **options)  # the fresh run's checkpoint now resumes
    assert again.history == fresh.history


def test_empty_sets_and_foreign_labels_are_refused_before_encoding(monkeypatch):
    model, classifier, data = fitted_with_classifier()
    import peft_residual.training.trainer as trainer

    monkeypatch.setattr(trainer, "encode_dataset", lambda *a, **k: pytest.fail("encoded bad data"))
    with pytest.raises(ResiDualInputError, match="eval_dataset is empty"):
        train_residual(model, classifier, data, data.select([]), progress=False)
    with pytest.raises(ResiDualInputError, match="train_dataset is empty"):
        train_residual(model, classifier, data.select([]), data, progress=False)
    six_classes = image_dataset(60, num_classes=6)
    with pytest.raises(ResiDualInputError, match=r"train_dataset: label 5 is outside the classifier's 4 classes"):
        train_residual(model, classifier, six_classes, data, progress=False)


def test_non_finite_training_images_and_loss_are_clear_errors():
    model, classifier, data = fitted_with_classifier()
    bad = image_dataset(32).with_format(None).map(lambda row: {"pixel_values": [[[math.nan] * 32] * 32] * 3})
    bad = bad.with_format("torch")
    with pytest.raises(ResiDualInputError, match="batch 0: pixel_values hold NaN"):
        train_residual(model, classifier, data, bad, progress=False)
    broken = Classifier(torch.full((4, classifier.weights.shape[1]), math.nan), 100.0, list("abcd"))
    with pytest.raises(ResiDualInputError, match=r"loss became nan.*check the classifier"):
        train_residual(model, broken, data, max_epochs=2, batch_size=16, progress=False)


@pytest.mark.parametrize("budget", [None, 1], ids=["in_memory", "spilled"])
def test_one_pass_cache_equals_the_two_pass_cache(budget):
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=4, units="heads+mlps", rest="mean"))
    data = image_dataset(96)
    batches = [data[i : i + 32] for i in range(0, 96, 32)]
    report = fit_residual_bases(model, batches, progress=False, keep_units=True, max_unit_bytes=budget)
    store = report.units
    assert len(store) == 96 and store.spilled == (budget == 1) and torch.equal(store.labels, data[:]["label"])
    spill = store.spill_directory
    two_pass = encode_dataset(model, data, batch_size=32, progress=False)  # the backbone batches of the fit
    one_pass = encode_dataset(model, store, batch_size=32, progress=False)
    torch.testing.assert_close(one_pass.scores, two_pass.scores, rtol=0, atol=0)
    torch.testing.assert_close(one_pass.offset, two_pass.offset, rtol=0, atol=0)
    assert torch.equal(one_pass.labels, two_pass.labels)
    again = get_peft_model(make_model("dinov2"), ResiDualConfig(k=4, units="heads+mlps", rest="mean"))
    fit_residual_bases(again, store, progress=False)  # fitting from the store: the same bases, no backbone
    for ours, theirs in zip(
        again.base_model.readout.transformed_layers("default"),
        model.base_model.readout.transformed_layers("default"),
        strict=True,
    ):
        assert torch.equal(ours.residual_basis["default"], theirs.residual_basis["default"])
    val = collect_units(model, [data[i : i + 16] for i in range(0, 32, 16)], progress=False)
    result = train_residual(model, CentroidClassifier.from_model(model, batches, list("abcd"), progress=False),
                            store, val, max_epochs=2, batch_size=16, progress=False)  # fmt: skip
    assert result.cached and result.epochs_run == 2
    store.close()
    assert spill is None or not spill.exists()


def test_an_adapter_of_selected_heads_trains_one_scale_per_head():
    model = get_peft_model(
        make_model("dinov2"), ResiDualConfig.coarse(heads=["layer0.head1", "layer1.head3"], lambda_init="ones")
    )
    data = image_dataset(48)
    fit_residual_bases(model, loader(48), progress=False)
    classifier = CentroidClassifier.from_model(model, [data[:]], list("abcd"), progress=False)
    result = train_residual(model, classifier, data, data, max_epochs=3, patience=3, progress=False)
    lambdas = [p for n, p in model.named_parameters() if "residual_lambda" in n and p.numel()]
    assert sorted(p.numel() for p in lambdas) == [1, 1] and result.epochs_run >= 1
    assert any(not torch.equal(p.detach(), torch.ones(1)) for p in lambdas)  # the two scales moved


def test_training_readout_matches_float64_and_gives_a_tile_the_same_result_in_any_batch():
    from peft_residual.training.scales import TILE, tiled_readout

    generator = torch.Generator().manual_seed(0)
    n, components, dim = 2 * TILE + 5, 50, 8
    scores, offset = torch.randn(n, components, generator=generator), torch.randn(n, dim, generator=generator)
    basis = torch.randn(components, dim, generator=generator)
    lambdas = (1 + torch.randn(components, dtype=torch.float64, generator=generator)).requires_grad_()
    weights = torch.randn(n, dim, dtype=torch.float64, generator=generator)
    out = tiled_readout(scores, lambdas, basis, offset)
    (out * weights).sum().backward()
    exact = offset.double() + (scores.double() * lambdas.detach()) @ basis.double()
    assert out.dtype == lambdas.grad.dtype == torch.float64
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        lambdas.grad, ((weights @ basis.double().T) * scores.double()).sum(0), rtol=1e-5, atol=1e-5
    )
    tile = slice(TILE, 2 * TILE)
    assert torch.equal(tiled_readout(scores[tile], lambdas.detach(), basis, offset[tile]), out.detach()[tile])


def test_processes_share_cached_batches_by_whole_tiles_and_streamed_ones_by_sample():
    from types import SimpleNamespace

    from peft_residual import StreamedUnits
    from peft_residual.training.cache import UnitCache
    from peft_residual.training.scales import TILE
    from peft_residual.training.steps import global_batches

    def shares(features, order, batch_size):
        return [
            [
                labels
                for _, _, labels, _ in global_batches(
                    features, order, batch_size, SimpleNamespace(process_index=r, num_processes=2)
                )
            ]
            for r in range(2)
        ]

    n = 3 * TILE + 3
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cached = shares(UnitCache(torch.zeros(n, 1), torch.zeros(n, 1), torch.arange(n)), order, 2 * TILE)
    tiles = order.split(TILE)  # batch 0 is tiles 0 and 1, batch 1 is tile 2 and the last 3 samples
    assert [s.tolist() for s in cached[0]] == [tiles[0].tolist(), tiles[2].tolist()]
    assert [s.tolist() for s in cached[1]] == [tiles[1].tolist(), tiles[3].tolist()]
    model, _, data = fitted_with_classifier(n=16)
    labels = torch.as_tensor(data["label"])
    streamed = shares(StreamedUnits(model, data), torch.arange(7), 5)
    expected = [[[0, 2, 4], [5]], [[1, 3], [6]]]  # sample by sample: a batch of 5 is less than one tile
    assert [[s.tolist() for s in rank] for rank in streamed] == [[labels[i].tolist() for i in r] for r in expected]


def test_every_refit_that_discards_changed_scales_warns():
    model, _, _ = fitted_with_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scales still at their initial values: nothing is lost, nothing to say
        fit_residual_bases(model, loader(n=128), progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)  # a hand-written loop, not train_residual
    model_output(model, loader(n=32)[0]["pixel_values"]).pow(2).sum().backward()
    optimizer.step()
    with pytest.warns(UserWarning, match="replaced scales that differed from their initial values"):
        fit_residual_bases(model, loader(n=128), progress=False)


def test_an_adapter_loaded_for_inference_refuses_training(tmp_path):
    model, classifier, data = fitted_with_classifier()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("dinov2"), tmp_path)  # PEFT's default: is_trainable=False
    with pytest.raises(ResiDualInputError, match="is_trainable=True"):
        train_residual(loaded, classifier, data, progress=False)
    trainable = PeftModel.from_pretrained(make_model("dinov2"), tmp_path, is_trainable=True)
    assert train_residual(trainable, classifier, data, max_epochs=1, batch_size=16, progress=False).epochs_run == 1
