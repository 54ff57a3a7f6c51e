"""The CLI's front: every option explains itself, and bad input exits 2 with exactly one line on stderr, before any
progress output."""

from __future__ import annotations

import argparse
import re

import pytest

from peft_residual import cli, hub
from peft_residual.cli import build_parser, main

from .testing_utils import run_main

COMMANDS = ["train", "eval", "fit", "push", "rank-heads", "analyze"]


def subparser(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default_once(command):
    parser = subparser(command)
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not silent, f"{command}: {silent} have no help"
    text = re.sub(r"\s+", " ", parser.format_help())
    assert "(default: None)" not in text
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            described = parser.formatter_class("x")._get_help_string(action) % {"default": action.default}
            assert described.count("default") <= 1, (command, action.option_strings[0], shown)
            if action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, bool):
                assert "default" in described, (command, action.option_strings[0], described)


def test_model_help_names_every_supported_family():
    text = re.sub(r"\s+", " ", subparser("train").format_help())
    for family in ("CLIP", "DINOv2", "ViT", "BLIP", "open_clip", "timm"):
        assert family in text, family


def one_line_error(capfd, *args) -> str:
    code, _, err = run_main(capfd, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err[-3000:])
    assert lines[0].startswith("peft-residual: error: "), lines[0]
    return lines[0]


def bert_directory(path):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["train", "eval", "fit", "push", "rank-heads", "analyze"])
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp, assets: tmp, "holds no model"),  # an empty directory
        (lambda tmp, assets: assets["dataset"], "holds no model"),  # a data set directory
        (
            lambda tmp, assets: bert_directory(tmp / "bert"),
            "ResiDual does not support BertModel",
        ),
    ],
    ids=["empty directory", "data set directory", "text model"],
)
def test_a_model_argument_that_is_not_a_supported_vision_model(
    tiny_assets, tmp_path, capfd, command, make, message, request
):
    model = make(tmp_path, tiny_assets)
    if command == "push":  # push asks the Hub who is logged in before it loads the model
        request.getfixturevalue("local_hub")
    options = {
        "train": ["--dataset", tiny_assets["dataset"], "--output", tmp_path / "out"],
        "eval": ["--dataset", tiny_assets["dataset"], "--adapter", tmp_path / "adapter"],
        "fit": ["--dataset", tiny_assets["dataset"], "--output", tmp_path / "out"],
        "push": ["--adapter", tmp_path / "adapter", "--repo-id", "me/x"],
        "rank-heads": ["--dataset", tiny_assets["dataset"], "--output", tmp_path / "out"],
        "analyze": ["--dataset", tiny_assets["dataset"], "--output", tmp_path / "out"],
    }[command]
    if command in ("eval", "push"):  # a real adapter with its classifier, so that the model is what is wrong
        source = ["--model", str(tiny_assets["dinov2"]), "--dataset", str(tiny_assets["dataset"])]
        trained = ["--k", "2", "--epochs", "1", "--output", str(tmp_path / "adapter")]
        assert main(["train", "--quiet", *source, *trained]) == 0
    line = one_line_error(capfd, command, "--model", model, *options)  # no progress bar before it: one line
    assert message in line and str(model) in line, line


@pytest.mark.parametrize("damage", ["no config", "config not JSON", "weights truncated"])
def test_a_damaged_adapter_is_refused_before_the_model_loads(tiny_assets, tmp_path, capfd, damage, monkeypatch):
    adapter = tmp_path / "adapter"
    assert main(["fit", "--quiet", "--model", str(tiny_assets["dinov2"]), "--dataset", str(tiny_assets["dataset"]),
                 "--k", "2", "--output", str(adapter)]) == 0  # fmt: skip
    if damage == "no config":
        (adapter / "adapter_config.json").unlink()
    elif damage == "config not JSON":
        (adapter / "adapter_config.json").write_text("{")
    else:
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    import peft_residual.data

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr(peft_residual.data, "load_vision_model", no_model_load)
    for command in (["eval", "--dataset", tiny_assets["dataset"]], ["push", "--repo-id", "me/x"]):
        line = one_line_error(capfd, *command, "--model", tiny_assets["dinov2"], "--adapter", adapter)
        assert str(adapter) in line, line


def test_the_image_size_is_checked_against_the_adapter_before_the_model_loads(
    tiny_assets, tmp_path, capfd, monkeypatch
):
    """An open_clip model is built at --image-size: loaded first, its weights' fingerprint would fail instead."""
    adapter = tmp_path / "adapter"
    source = ["--model", str(tiny_assets["dinov2"]), "--dataset", str(tiny_assets["dataset"])]
    assert main(["train", "--quiet", *source, "--k", "2", "--epochs", "1", "--output", str(adapter)]) == 0
    import peft_residual.data

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the image size was checked")

    monkeypatch.setattr(peft_residual.data, "load_vision_model", no_model_load)
    line = one_line_error(capfd, "eval", *source, "--adapter", adapter, "--image-size", "16")
    assert "fitted on 32x32 px images but --image-size is 16; pass --image-size 32" in line
    line = one_line_error(capfd, "train", *source, "--bases", adapter, "--image-size", "16", "--output", tmp_path / "t")
    assert "fitted on 32x32 px images but these come out at 16x16; pass --image-size 32" in line
    line = one_line_error(capfd, "train", *source, "--bases", adapter, "--k", "3", "--output", tmp_path / "t")
    assert "drop --k" in line


def test_a_warning_is_one_line_of_the_cli_s_own(monkeypatch, capfd):
    def run(args):
        from peft_residual.errors import warn_caller

        warn_caller("160 reference images for units of up to 384 dimensions")

    monkeypatch.setattr("peft_residual.cli.cmd_fit", run)
    assert main(["fit", "--model", "m", "--dataset", "d", "--output", "o"]) == 0
    assert capfd.readouterr().err == "peft-residual: warning: 160 reference images for units of up to 384 dimensions\n"


def test_missing_adapters_and_a_fit_only_adapter_are_one_line_before_any_model_loads(
    tiny_assets, tmp_path, capfd, monkeypatch
):
    import peft_residual.data

    source = ["--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"]]
    fit = tmp_path / "fit"
    assert run_main(capfd, "fit", "--quiet", *source, "--k", "2", "--output", fit)[0] == 0
    monkeypatch.setattr(peft_residual.data, "load_vision_model", lambda *a, **k: pytest.fail("loaded a model"))
    cases = [
        (["eval", *source, "--adapter", "nope"], "no adapter at 'nope': no such directory"),
        (["train", *source, "--bases", "nope", "--output", tmp_path / "t"], "no adapter at 'nope'"),
        (["push", "--model", tiny_assets["dinov2"], "--adapter", "nope", "--repo-id", "me/x"], "no adapter at 'nope'"),
        (["eval", *source, "--adapter", fit], f"{fit} holds no classifier/ (fit writes bases only): train"),
        (["eval", *source, "--adapter", fit, "--classifier", tmp_path], f"no classifier at {str(tmp_path)!r}"),
    ]
    for args, message in cases:
        assert message in one_line_error(capfd, *args), args


@pytest.mark.parametrize("hub", ["offline", "refused"])
def test_push_to_a_hub_it_cannot_reach_is_one_line(tiny_assets, tmp_path, capfd, monkeypatch, hub):
    from huggingface_hub import constants, hf_api

    adapter = tmp_path / "trained"
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"]]
    assert run_main(capfd, "train", *source, "--epochs", "1", "--output", adapter)[0] == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub == "offline")
    monkeypatch.setattr(hf_api.api, "endpoint", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    push = ["push", "--quiet", "--model", tiny_assets["dinov2"], "--adapter", adapter, "--repo-id", "me/x"]

    def no_model(args):
        raise AssertionError("push loaded the model before it reached the Hub")

    monkeypatch.setattr(cli, "_model", no_model)  # the Hub is tried first, so a push that cannot reach it loads none
    line = one_line_error(capfd, *push)
    assert line.startswith("peft-residual: error: cannot push to the Hub: ")
    where = "(HF_HUB_OFFLINE is set: only files already cached)" if hub == "offline" else "(Hub at http://127.0.0.1:9)"
    assert line.endswith(where), line  # says where the Hub was, or that it was not asked


def test_push_with_a_token_the_hub_refuses_is_one_line_and_creates_nothing(
    tiny_assets, tmp_path, capfd, monkeypatch, local_hub
):
    adapter = tmp_path / "fitted"
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"], "--k", "2"]
    assert run_main(capfd, "fit", *source, "--output", adapter)[0] == 0
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_servers")

    def no_model(args):
        raise AssertionError("push loaded the model before the Hub accepted its token")

    monkeypatch.setattr(cli, "_model", no_model)
    line = one_line_error(capfd, "push", "--quiet", "--model", tiny_assets["dinov2"], "--adapter", adapter,
                          "--repo-id", "me/x")  # fmt: skip
    assert line.startswith("peft-residual: error: cannot push to the Hub: Invalid user token"), line
    assert not local_hub.state.repos


@pytest.mark.parametrize("repo_id", ["bad..id/xy", "a/b/c"])
def test_push_to_a_bad_repo_id_is_one_line_before_the_model_loads(tiny_assets, tmp_path, capfd, monkeypatch, repo_id):
    adapter = tmp_path / "fitted"
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"], "--k", "2"]
    assert run_main(capfd, "fit", *source, "--output", adapter)[0] == 0

    def no_model(args):
        raise AssertionError("push loaded the model for a repository id it cannot use")

    monkeypatch.setattr(cli, "_model", no_model)
    line = one_line_error(capfd, "push", "--model", tiny_assets["dinov2"], "--adapter", adapter, "--repo-id", repo_id)
    assert line.startswith(f"peft-residual: error: --repo-id {repo_id!r} is no Hub repository id: "), line


def test_fit_into_a_train_run_is_refused_or_with_overwrite_clears_it(tiny_assets, tmp_path, capfd, monkeypatch):
    """New bases in a directory holding a train run would leave its head, summary and checkpoint stale (eval read the
    old head against the new scales): refused before the model loads, or removed with --overwrite."""
    output = tmp_path / "run"
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"], "--k", "2"]
    assert run_main(capfd, "train", *source, "--epochs", "1", "--output", output)[0] == 0
    assert all((output / name).exists() for name in cli.TRAIN_RUN_FILES)
    assert cli.TRAIN_RUN_FILES[0] == hub.CLASSIFIER_DIR  # the CLI spells it without importing hub (stdlib only)
    load_model = cli._model

    def no_model(args):
        raise AssertionError("fit loaded the model before it refused the output")

    monkeypatch.setattr(cli, "_model", no_model)
    line = one_line_error(capfd, "fit", *source, "--output", output)
    assert line == (
        f"peft-residual: error: --output {output} holds a train run (classifier, training.json, checkpoint), which "
        "new bases would leave stale; choose another --output, or pass --overwrite to remove it"
    )
    monkeypatch.setattr(cli, "_model", load_model)
    assert run_main(capfd, "fit", *source, "--output", output, "--overwrite")[0] == 0
    assert not any((output / name).exists() for name in cli.TRAIN_RUN_FILES)
    assert (output / "adapter_model.safetensors").is_file()


def test_eval_with_a_classifier_of_other_classes_is_refused(tiny_assets, tmp_path, capfd):
    """A head trained on other classes gives a number that means nothing, even with as many classes."""
    from datasets import ClassLabel, load_from_disk

    adapter, renamed = tmp_path / "run", tmp_path / "renamed"
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--k", "2"]
    assert run_main(capfd, "train", *source, "--dataset", tiny_assets["dataset"], "--epochs", "1", "--output",
                    adapter)[0] == 0  # fmt: skip
    data = load_from_disk(str(tiny_assets["dataset"]))
    names = data["train"].features["label"].names
    other = [f"other-{name}" for name in names]  # as many classes, other names
    data.cast_column("label", ClassLabel(names=other)).save_to_disk(str(renamed))
    line = one_line_error(capfd, "eval", *source[:3], "--dataset", renamed, "--adapter", adapter)
    assert line.startswith(f"peft-residual: error: the classifier's classes ({names[0]}, ") and (
        f"are not those of {renamed} (other-{names[0]}, " in line
    ), line


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "0.0", "many"])
def test_a_bad_k_names_the_option(tiny_assets, tmp_path, capfd, value):
    """--k is checked as the option it is (exit 2, one line naming --k), not as ResiDualConfig.k after the model
    loads."""
    code, _, err = run_main(capfd, "fit", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"],
                            "--k", value, "--output", tmp_path / "out")  # fmt: skip
    assert code == 2 and "argument --k: expected a positive number of components, a variance ratio" in err, err
    assert "ResiDualConfig" not in err and len(err.strip().splitlines()) == 1


def test_k_takes_a_count_or_a_ratio():
    parse = subparser("fit").parse_args
    assert parse(["--model", "m", "--dataset", "d", "--output", "o", "--k", "8"]).k == 8
    assert parse(["--model", "m", "--dataset", "d", "--output", "o", "--k", "0.9"]).k == 0.9
    args = parse(["--model", "m", "--dataset", "d", "--output", "o", "--k", "all", "--method", "residual*"])
    assert cli._config(args).k is None  # all components, whatever the preset's k


@pytest.mark.parametrize("command", ["rank-heads", "analyze"])
def test_analysis_commands_help_says_their_own_defaults(command):
    """rank-heads and analyze draw 2,000 images unless told, and read no adapter: their help says so."""
    parser = subparser(command)
    text = re.sub(r"\s+", " ", parser.format_help())
    assert "--samples SAMPLES use this many images, drawn with --seed (default: 2000)" in text
    assert "--adapter" not in text and "--bases" not in text
    assert parser.parse_args(["--model", "m", "--dataset", "d", "--output", "o"]).samples == cli.ANALYSIS_SAMPLES
    assert subparser("fit").parse_args(["--model", "m", "--dataset", "d", "--output", "o"]).samples is None


def test_train_over_another_runs_checkpoint_is_refused_before_the_model_loads(
    tiny_assets, tmp_path, capfd, monkeypatch
):
    """Other hyper-parameters are known before any work: refused then, not after the backbone pass and the fit
    (minutes on a large data set); the same ones resume, as before."""
    output = tmp_path / "run"
    source = ["--quiet", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"], "--k", "2"]
    assert run_main(capfd, "train", *source, "--epochs", "1", "--output", output)[0] == 0
    load_model = cli._model

    def no_model(args):
        raise AssertionError("train loaded the model before it refused the checkpoint")

    monkeypatch.setattr(cli, "_model", no_model)
    line = one_line_error(capfd, "train", *source, "--epochs", "1", "--lr", "0.5", "--output", output)
    assert "holds the checkpoint of another run (other hyper-parameters: lr 0.8 saved vs 0.5 now)" in line, line
    monkeypatch.setattr(cli, "_model", load_model)
    code, _, err = run_main(capfd, "train", *source, "--epochs", "1", "--output", output)  # the same run
    assert code == 0, err
