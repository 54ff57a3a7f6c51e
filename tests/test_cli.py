import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import Dinov2Model

from peft_residual import (
    CentroidClassifier,
    ResiDualConfig,
    accuracy,
    analysis,
    collect_units,
    embed_batches,
    embed_images,
    fit_residual_bases,
    load_vision_model,
)
from peft_residual.cli import main
from peft_residual.data import load_image_dataset, prepare, sample

from .conftest import CLASS_NAMES, adapter_accuracies, images
from .scripts.count_images import count_images
from .testing_utils import run_main


def cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "peft_residual.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", **_env()})


def _env() -> dict:
    import os

    return dict(os.environ)


def test_console_script_is_installed():
    assert shutil.which("peft-residual") is not None


def test_help_lists_the_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("fit", "train", "eval", "push", "rank-heads", "analyze"):
        assert command in result.stdout
    train_help = cli("train", "--help").stdout
    assert "--image-column" in train_help and "--templates" in train_help


def test_fit_train_eval_on_tiny_dinov2(tiny_assets, tmp_path, capfd):
    model, dataset = tiny_assets["dinov2"], tiny_assets["dataset"]
    code, out, err = run_main(
        capfd, "fit", "--model", model, "--dataset", dataset, "--k", "3", "--method", "residual*",
        "--output", tmp_path / "fit",
    )  # fmt: skip
    assert code == 0, err
    fitted = PeftModel.from_pretrained(load_vision_model(str(model)), tmp_path / "fit")
    again = get_peft_model(load_vision_model(str(model)), ResiDualConfig.preset("residual*", k=3))  # the API's fit
    images_seen = prepare(sample(load_image_dataset(str(dataset), "train"), None, seed=0), str(model))
    report = fit_residual_bases(again, DataLoader(images_seen, batch_size=64), progress=False)
    assert out.strip() == f"fitted {report.num_scales:,} scales on 96 images; adapter saved to {tmp_path / 'fit'}"
    x = images(4, seed=7)
    assert torch.allclose(embed_images(fitted, x), embed_images(again, x), atol=1e-5)
    assert not torch.allclose(embed_images(fitted, x), embed_images(load_vision_model(str(model)), x), atol=1e-3)

    trained = tmp_path / "trained"
    seen = []
    handle = count_images(seen)
    try:
        code, out, err = run_main(
            capfd, "train", "--model", model, "--dataset", dataset, "--epochs", "3", "--output", trained
        )
    finally:
        handle.remove()
    assert code == 0, err
    assert sum(seen) == 96  # one backbone pass per training and validation image: centroids, fit and cache share it
    assert "best validation accuracy" in out
    summary = json.loads((trained / "training.json").read_text())
    assert summary["training_samples"] + summary["validation_samples"] == 96 and summary["epochs"] <= 3
    assert json.loads((trained / "classifier" / "classifier.json").read_text())["kind"] == "centroid"
    assert any("residual_lambda" in key for key in load_file(trained / "adapter_model.safetensors"))

    code, out, err = run_main(capfd, "eval", "--model", model, "--dataset", dataset, "--adapter", trained)
    assert code == 0, err
    zero_shot, adapted = adapter_accuracies(model, dataset, trained)  # the same through the public API
    assert out.strip() == f"48 images: centroids {100 * zero_shot:.2f}%  ResiDual {100 * adapted:.2f}%"


def test_train_on_bases_fitted_elsewhere_keeps_them_and_checks_them(tiny_assets, tmp_path, capfd):
    """The paper's protocol: `fit` on a reference split, then `train --bases` on the target: one pass over the
    target images (centroids and cache, no fit), the saved bases are the reference's, only λ change."""
    model, dataset = tiny_assets["dinov2"], tiny_assets["dataset"]
    reference = tmp_path / "reference"
    source = ["--quiet", "--model", model, "--dataset", dataset]
    assert run_main(capfd, "fit", *source, "--split", "test", "--k", "3", "--output", reference)[0] == 0
    seen, handle = [], None
    handle = count_images(seen)
    try:
        code, _, err = run_main(
            capfd, "train", *source, "--bases", reference, "--epochs", "2", "--output", tmp_path / "target"
        )
    finally:
        handle.remove()
    assert code == 0, err
    assert sum(seen) == 96  # the 96 target images once; nothing refitted
    fitted, trained = (load_file(path / "adapter_model.safetensors") for path in (reference, tmp_path / "target"))
    assert set(fitted) == set(trained)
    for key in fitted:
        if "residual_lambda" in key:
            assert not torch.equal(trained[key], fitted[key]), key  # trained
        else:
            assert torch.equal(trained[key], fitted[key]), key  # the reference's bases and means, untouched
    config = json.loads((tmp_path / "target" / "adapter_config.json").read_text())
    assert config["k"] == 3 and config["training_summary"]["training_samples"] > 0

    code, _, err = run_main(capfd, "train", *source, "--bases", reference, "--image-size", "16", "--output", tmp_path)
    assert code == 2 and "fitted on 32x32 px images but these come out at 16x16" in err
    code, _, err = run_main(capfd, "train", *source, "--bases", reference, "--k", "5", "--output", tmp_path / "x")
    assert code == 2 and "drop --k" in err
    code, _, err = run_main(capfd, "train", *source, "--bases", tmp_path / "none", "--output", tmp_path / "x")
    assert code == 2 and "no bases at" in err
    shutil.copytree(model, tmp_path / "other-model")  # the same model but for its weights
    other = Dinov2Model.from_pretrained(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn_like(parameter))
    other.save_pretrained(tmp_path / "other-model")
    code, _, err = run_main(
        capfd, "train", "--quiet", "--model", tmp_path / "other-model", "--dataset", dataset, "--bases", reference,
        "--output", tmp_path / "x",
    )  # fmt: skip
    assert code == 2 and "fitted on another base model" in err


def test_train_with_clip_uses_zero_shot_text_head(tiny_assets, tmp_path):
    result = cli(
        "train", "--model", tiny_assets["clip"], "--dataset", tiny_assets["dataset"], "--templates", "cifar10",
        "--method", "residual*", "--epochs", "2", "--output", tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "classifier" / "classifier.json").read_text())["kind"] == "zero_shot"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model", "--dataset", "DATA"], "no model at '/no/such/model'"),
        (["--model", "MODEL", "--dataset", "/no/such/data"], "no dataset at '/no/such/data'"),
        (["--model", "MODEL", "--dataset", "DATA", "--image-column", "picture"], "No column 'picture'"),
        (["--model", "BERT", "--dataset", "DATA"], "ResiDual does not support"),
        (["--model", "MODEL", "--dataset", "DATA", "--image-size", "7"], "not a multiple of the model's 8-pixel"),
        (["--model", "MODEL", "--dataset", "DATA", "--samples", "0"], "expected a positive integer, got 0"),
        (
            ["--model", "MODEL", "--dataset", "DATA", "--k", "abc"],
            "argument --k: expected a positive number of components",
        ),
        (["--model", "MODEL", "--dataset", "DATA", "--method", "lora"], "invalid choice"),
        (["--model", "MODEL", "--dataset", "DATA", "--samples", "1"], "saw 1 image"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_assets, tmp_path, capfd, args, message):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(bert)
    names = {"MODEL": str(tiny_assets["dinov2"]), "DATA": str(tiny_assets["dataset"]), "BERT": str(bert)}
    args = [names.get(a, a) for a in args]
    capfd.readouterr()  # drop what building the BERT model printed
    try:  # in process, to spare a Python start per case; usage errors exit through argparse
        code = main(["fit", "--quiet", *args, "--output", str(tmp_path / "out")])
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    stderr = capfd.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("peft-residual: error:") and message in lines[0]


def test_help_and_version_answer():
    # Importing the package registers the method with PEFT (no import hook), so --help pays for importing PEFT.
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("peft-residual 0.")
    train_help = cli("train", "--help").stdout
    assert "(default: 0.8)" in train_help and "take them from --bases), train the scales" in train_help


def test_internal_errors_are_not_turned_into_one_liners(monkeypatch, tiny_assets, tmp_path):
    import peft_residual.cli as cli_module

    def broken(args):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(cli_module, "cmd_fit", broken)
    args = ["fit", "--model", str(tiny_assets["dinov2"]), "--dataset", str(tiny_assets["dataset"])]
    with pytest.raises(RuntimeError, match="a bug"):
        main([*args, "--output", str(tmp_path)])


def test_eval_and_train_on_bases_default_to_the_size_the_adapter_was_fitted_at(tiny_assets, tmp_path, capfd):
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"]]
    out = tmp_path / "trained"  # fitted at 16 px; the processor's size is 32
    assert run_main(capfd, "train", *source, "--epochs", "1", "--image-size", "16", "--output", out)[0] == 0
    code, stdout, err = run_main(capfd, "eval", *source, "--adapter", out)
    assert code == 0 and "ResiDual" in stdout and not err
    code, _, err = run_main(capfd, "train", *source, "--epochs", "1", "--bases", out, "--output", tmp_path / "again")
    assert code == 0 and not err
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["base_signature"]["image_size"] == [16, 16]


def test_eval_refuses_another_image_size_and_foreign_labels(tiny_assets, tmp_path, capfd):
    model, dataset = tiny_assets["dinov2"], tiny_assets["dataset"]
    out = tmp_path / "trained"
    source = ["--quiet", "--model", model, "--dataset", dataset]
    assert run_main(capfd, "train", *source, "--epochs", "1", "--output", out)[0] == 0
    code, _, err = run_main(capfd, "eval", *source, "--adapter", out, "--image-size", "16")
    assert code == 2 and "fitted on 32x32 px images but --image-size is 16" in err
    classifier = json.loads((out / "classifier" / "classifier.json").read_text())
    classifier["class_names"] = classifier["class_names"][:2]
    from safetensors.torch import save_file

    weights = load_file(out / "classifier" / "classifier.safetensors")["weights"][:2].contiguous()
    small = tmp_path / "two_classes"
    small.mkdir()
    (small / "classifier.json").write_text(json.dumps(classifier))
    save_file({"weights": weights}, small / "classifier.safetensors")
    code, _, err = run_main(capfd, "eval", *source, "--adapter", out, "--classifier", small)
    assert code == 2 and "the classifier's classes (cat, dog) are not those of" in err  # named before any pass
    (out / "adapter_config.json").write_text("{not json")
    code, _, err = run_main(capfd, "eval", *source, "--adapter", out)
    assert code == 2 and "adapter_config.json is not valid JSON" in err and len(err.strip().splitlines()) == 1


def test_main_returns_an_exit_code_for_a_missing_adapter(tiny_assets, tmp_path, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(tiny_assets["dinov2"]),
            "--dataset",
            str(tiny_assets["dataset"]),
            "--adapter",
            str(tmp_path),
        ]
    )
    assert code == 2 and "no adapter_config.json" in capsys.readouterr().err


def test_cli_presets_are_the_tuner_presets():
    from peft_residual import PRESETS
    from peft_residual.cli import PRESET_NAMES

    assert list(PRESET_NAMES) == list(PRESETS)


def test_rank_heads_writes_curves_and_plot(tiny_assets, tmp_path, capfd):
    code, out, err = run_main(
        capfd, "rank-heads", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"], "--quiet",
        "--output", tmp_path / "heads",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("full model") and "top heads by S" in out
    curves = json.loads((tmp_path / "heads" / "heads.json").read_text())
    assert set(curves["curves"]) == {"S", "U", "U|T", "random"} and curves["num_heads"] == 8
    assert sorted(curves["rankings"]["U"]) == sorted(f"layer{i}.head{h}" for i in range(2) for h in range(4))
    assert (tmp_path / "heads" / "heads.png").read_bytes()[:4] == b"\x89PNG"
    # the full model's accuracy again through the public API: centroids of every training image, all test images
    source, dataset = str(tiny_assets["dinov2"]), str(tiny_assets["dataset"])
    model = load_vision_model(source)
    train, test = (prepare(load_image_dataset(dataset, split), source) for split in ("train", "test"))
    classifier = CentroidClassifier.from_model(model, DataLoader(train, batch_size=64), CLASS_NAMES, progress=False)
    features, labels = embed_batches(model, DataLoader(test, batch_size=64), progress=False)
    assert curves["full_accuracy"] == accuracy(classifier(features), labels)
    assert out.startswith(f"full model {100 * curves['full_accuracy']:.1f}%;")


def test_analyze_reports_dimensions_similarity_and_textspan(tiny_assets, tmp_path, capfd):
    code, out, err = run_main(
        capfd, "analyze", "--model", tiny_assets["clip"], "--dataset", tiny_assets["dataset"], "--quiet",
        "--compare-dataset", tiny_assets["dataset"], "--samples", "40", "--text-steps", "3", "--output", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert "hunchback" in out and "TextSpan descriptions of 8 heads" in out
    dims = json.loads((tmp_path / "intrinsic_dimension.json").read_text())
    assert len(dims["layer_profile"]["two_nn"]["heads"]) == 2 and "layer1.mlp" in dims["units"]
    # the dimensions again through the public API, on the same 40 training images (drawn with seed 0)
    clip = load_vision_model(str(tiny_assets["clip"]))
    drawn = sample(load_image_dataset(str(tiny_assets["dataset"]), "train"), 40, seed=0)
    store = collect_units(clip, DataLoader(prepare(drawn, str(tiny_assets["clip"])), batch_size=64), progress=False)
    again = analysis.unit_dimensions(store.contributions(), store.arch.unit_names)
    assert dims["units"].keys() == again.keys()
    for unit, values in again.items():
        assert dims["units"][unit] == pytest.approx(values, rel=1e-4), unit
    spectral = json.loads((tmp_path / "spectral_similarity.json").read_text())
    assert all(abs(v - 1.0) < 1e-6 for v in spectral["same_unit"].values())  # the same images twice
    spans = json.loads((tmp_path / "textspan.json").read_text())
    assert len(spans["layer0.head0"]) == 3 and all(isinstance(text, str) for text, _ in spans["layer0.head0"])
    for png in ("intrinsic_dimension.png", "spectral_similarity.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_paths_string_labels_and_a_plain_dataset_are_accepted(tiny_assets, tmp_path, capfd):
    """An image column of file paths, string labels and a Dataset without splits: the CLI decodes, encodes and
    treats it as the training split (a test split it lacks is one clear line, not a dump of its rows)."""
    import datasets

    source = datasets.load_from_disk(str(tiny_assets["dataset"]))["train"]
    names = source.features["label"].names
    paths = []
    for index, example in enumerate(source):
        paths.append(str(tmp_path / f"{index}.png"))
        example["image"].save(paths[-1])
    plain = datasets.Dataset.from_dict({"path": paths, "name": [names[label] for label in source["label"]]})
    plain.save_to_disk(str(tmp_path / "plain"))
    common = ["--model", tiny_assets["dinov2"], "--dataset", tmp_path / "plain", "--image-column", "path"]
    common += ["--label-column", "name", "--quiet"]
    code, _, err = run_main(capfd, "train", *common, "--epochs", "1", "--output", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "classifier" / "classifier.json").read_text())["class_names"] == sorted(names)
    code, _, err = run_main(capfd, "eval", *common, "--adapter", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "has no split 'test'; it has ['train']" in err


def test_an_output_that_is_a_file_is_refused_before_any_model_work(tiny_assets, tmp_path, capfd, monkeypatch):
    import peft_residual.data

    monkeypatch.setattr(peft_residual.data, "load_vision_model", lambda *a: pytest.fail("loaded a model"))
    (tmp_path / "taken").write_text("mine")
    args = ["train", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"], "--output"]
    code, _, err = run_main(capfd, *args, tmp_path / "taken")
    assert code == 2 and err.count("\n") == 1 and "is a file" in err
    assert (tmp_path / "taken").read_text() == "mine"


def test_an_image_column_of_encoded_bytes_and_string_labels_are_normalised():
    import io

    import datasets
    from PIL import Image

    from peft_residual.data import as_image_classification, class_names

    encoded = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(encoded, format="PNG")
    raw = datasets.Dataset.from_dict({"img": [encoded.getvalue()] * 3, "label": ["dog", "cat", "dog"]})
    data = as_image_classification(raw, "img", "label")
    assert data[0]["img"].size == (8, 8) and data[0]["img"].getpixel((0, 0)) == (255, 0, 0)
    assert class_names(data) == ["cat", "dog"] and data["label"] == [1, 0, 1]


def test_push_uploads_the_adapter_and_its_card_and_pulls_back_the_same(tiny_assets, tmp_path, capfd, local_hub):
    """`push` to the tests' local Hub server, then back through huggingface_hub and PEFT: the same files, tensors
    and adapted embeddings as the local adapter, and our card with the training summary."""
    from huggingface_hub import snapshot_download

    model, adapter = tiny_assets["dinov2"], tmp_path / "trained"
    source = ["--quiet", "--model", model, "--dataset", tiny_assets["dataset"]]
    assert run_main(capfd, "train", *source, "--epochs", "1", "--output", adapter)[0] == 0
    code, out, err = run_main(capfd, "push", "--quiet", "--model", model, "--adapter", adapter, "--repo-id", "me/tiny")
    assert code == 0, err
    repo = local_hub.state.repos["me/tiny"]
    assert len(repo.commits) == 1 and out.strip() == f"pushed to {local_hub.endpoint}/me/tiny/commit/{repo.sha}"

    pulled = tmp_path / "pulled"
    snapshot_download("me/tiny", local_dir=pulled, endpoint=local_hub.endpoint)
    assert sorted(p.name for p in pulled.iterdir() if not p.name.startswith(".")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "classifier"
    ]  # fmt: skip
    for name in ("classifier.json", "classifier.safetensors"):  # the head eval reads went with the adapter
        assert (pulled / "classifier" / name).read_bytes() == (adapter / "classifier" / name).read_bytes()
    local, remote = (load_file(path / "adapter_model.safetensors") for path in (adapter, pulled))
    assert set(local) == set(remote) and all(torch.equal(local[key], remote[key]) for key in local)
    assert json.loads((pulled / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text()
    )
    card = (pulled / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "# ResiDual adapter for" in card
    assert f"- dataset: {tiny_assets['dataset']}" in card  # training.json, beside the adapter, went into the card
    assert 'Classifier.from_pretrained("me/tiny", subfolder="classifier")' in card
    # eval by the repository's id reads the adapter and its classifier from the Hub, as eval of the directory does
    check = ["--quiet", "--model", model, "--dataset", tiny_assets["dataset"], "--samples", "24"]
    from_hub, from_disk = (run_main(capfd, "eval", *check, "--adapter", a) for a in ("me/tiny", adapter))
    assert from_hub[0] == from_disk[0] == 0 and from_hub[1] == from_disk[1] and "ResiDual" in from_hub[1]

    x = images(4, seed=7)
    from_hub = PeftModel.from_pretrained(load_vision_model(str(model)), "me/tiny")  # by repo id, through the server
    from_disk = PeftModel.from_pretrained(load_vision_model(str(model)), adapter)
    assert torch.equal(embed_images(from_hub, x), embed_images(from_disk, x))
    assert not torch.equal(embed_images(from_hub, x), embed_images(load_vision_model(str(model)), x))


def test_a_push_without_a_classifier_leaves_none_on_the_hub_and_eval_names_the_fix(
    tiny_assets, tmp_path, capfd, local_hub, monkeypatch
):
    """A fit-only adapter pushed over a trained run's repository removes that run's classifier/ (it belongs to other
    scales); eval by the repository's id then refuses in one line, before the model loads."""
    from peft_residual import Classifier, ResiDualInputError, cli

    model, trained, fitted = tiny_assets["dinov2"], tmp_path / "trained", tmp_path / "fitted"
    source = ["--quiet", "--model", model, "--dataset", tiny_assets["dataset"]]
    assert run_main(capfd, "train", *source, "--k", "2", "--epochs", "1", "--output", trained)[0] == 0
    assert run_main(capfd, "fit", *source, "--k", "2", "--output", fitted)[0] == 0
    push = ["push", "--quiet", "--model", model, "--repo-id", "me/run"]
    assert run_main(capfd, *push, "--adapter", trained)[0] == 0
    files = local_hub.state.repos["me/run"].files
    assert {"classifier/classifier.json", "classifier/classifier.safetensors"} <= set(files)
    import huggingface_hub

    real_file_exists, asked = huggingface_hub.file_exists, []
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda *a, **k: asked.append(a) or real_file_exists(*a, **k))
    pushed = Classifier.from_pretrained("me/run", subfolder="classifier")
    assert pushed.class_names == Classifier.from_pretrained(trained / "classifier").class_names
    assert asked == []  # the download itself finds the file: no request beforehand
    with pytest.raises(ResiDualInputError, match=r'it has one in classifier/: pass subfolder="classifier"'):
        Classifier.from_pretrained("me/run")  # the repository's root holds none
    assert run_main(capfd, *push, "--adapter", fitted)[0] == 0
    assert not any(name.startswith("classifier/") for name in local_hub.state.repos["me/run"].files)

    def no_model(args):
        raise AssertionError("eval loaded the model before it found no classifier")

    monkeypatch.setattr(cli, "_model", no_model)
    code, _, err = run_main(capfd, "eval", *source, "--adapter", "me/run")
    assert code == 2 and err.strip().splitlines() == [
        "peft-residual: error: the Hub adapter me/run holds no classifier/ (pushed from fit, which writes bases only): "
        "train its scales with `peft-residual train --bases me/run` and push that, or pass --classifier DIR"
    ]


def test_push_without_quiet_shows_no_library_request_logs(tiny_assets, tmp_path, capfd, local_hub):
    """Not --quiet, in a process of its own (pytest's log handlers would hide the CLI's logging set-up): this
    package's notes may show, but not httpx's line per Hub request, and the refusal is the last line."""
    adapter = tmp_path / "fitted"
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"], "--k", "2"]
    assert run_main(capfd, "fit", *source, "--output", adapter)[0] == 0
    command = [sys.executable, "-m", "peft_residual.cli", "push", "--model", str(tiny_assets["dinov2"]), "--adapter",
               str(adapter), "--repo-id", "me/x"]  # fmt: skip
    env = {**_env(), "HF_ENDPOINT": local_hub.endpoint, "HF_TOKEN": "hf_not_the_servers", "HF_HUB_OFFLINE": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "HTTP Request" not in result.stderr, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("peft-residual: error: cannot push to the Hub: Invalid user token")
    ), result.stderr


def test_the_model_runs_on_accelerates_device(tiny_assets, monkeypatch):
    """On a GPU machine the backbone pass and training run on the GPU: the CLI puts the model where Accelerate's
    state says (``meta`` stands in for a GPU here)."""
    import accelerate

    from peft_residual.cli import _model, build_parser

    monkeypatch.setattr(accelerate, "PartialState", lambda: type("State", (), {"device": torch.device("meta")})())
    args = build_parser().parse_args(["fit", "--model", str(tiny_assets["dinov2"]), "--dataset", "d", "--output", "o"])
    assert {parameter.device.type for parameter in _model(args).parameters()} == {"meta"}


def test_train_quiet_prints_only_its_result_and_eval_names_a_trained_head_s_baseline(tiny_assets, tmp_path, capfd):
    source = ["--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"]]
    out = tmp_path / "trained"
    args = ["train", "--quiet", *source, "--epochs", "2", "--head", "linear", "--output", out]
    code, stdout, err = run_main(capfd, *args)
    assert code == 0 and err == ""  # no progress bar, the PCA's included
    summary = json.loads((out / "training.json").read_text())
    pattern = r"best validation accuracy [\d.]+% at epoch [12] of 2; adapter and classifier saved to .*\n"
    assert re.fullmatch(pattern, stdout)
    assert summary["epochs"] == 2
    code, stdout, err = run_main(capfd, "eval", "--quiet", *source, "--adapter", out)
    assert code == 0 and stdout.startswith("48 images: base model + trained linear head ") and "ResiDual" in stdout
    # --lr auto says the rate its range test found, as training.json records it
    auto = ["train", "--quiet", *source, "--epochs", "1", "--lr", "auto", "--output", tmp_path / "auto"]
    code, stdout, err = run_main(capfd, *auto)
    found = json.loads((tmp_path / "auto" / "training.json").read_text())["learning_rate"]
    assert code == 0 and f" of 1 with lr {found:.3g} (found by the range test); adapter" in stdout, stdout
