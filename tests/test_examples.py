"""Each example runs end to end on tiny local assets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import adapter_accuracies

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, env=ENV, check=check, cwd=ROOT)


def test_quickstart_on_local_assets(tiny_assets, tmp_path):
    out, count = tmp_path / "adapter", tmp_path / "count.json"
    result = run(
        sys.executable, "tests/scripts/count_images.py", count, "examples/quickstart.py",
        "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"],
        "--train-samples", "80", "--test-samples", "40", "--epochs", "2", "--output", out,
    )  # fmt: skip
    base, adapted = adapter_accuracies(tiny_assets["dinov2"], tiny_assets["dataset"], out, samples=40)
    # DINOv2 has no text tower: its head is the class centroids, never called zero-shot
    printed = f"centroids {100 * base:.1f}%  ->  ResiDual {100 * adapted:.1f}%"  # the saved adapter's own
    assert result.stdout.splitlines()[-2].startswith(printed), result.stdout
    # one backbone pass per training and validation image (centroids, fit and cache share it), and one per test
    # image: the base and the adapted embedding come from the same pass
    assert json.loads(count.read_text())["images"] == 80 + 40
    assert "Warning" not in result.stderr, result.stderr  # a user's first run is clean


def test_quickstart_without_network_says_so_in_one_line(tmp_path):
    result = run(sys.executable, "examples/quickstart.py", "--output", tmp_path, check=False)
    assert result.returncode == 1
    assert result.stdout.startswith("Cannot load openai/clip-vit-base-patch32") and "Offline, run:" in result.stdout


@pytest.mark.slow
def test_accelerate_example_on_two_processes(tiny_assets, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = run(
        *launch, "examples/accelerate_train.py", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"],
        "--epochs", "2", "--output", tmp_path,
    )  # fmt: skip
    assert "2 processes: best validation accuracy" in result.stdout
    assert "residual_lambda" in " ".join(load_file(tmp_path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_compare_lora_example(tiny_assets, tmp_path):
    result = run(
        sys.executable, "examples/compare_lora.py", "--model", tiny_assets["dinov2"],
        "--dataset", tiny_assets["dataset"], "--train-size", "64", "--test-size", "32", "--max-epochs", "2",
        "--out", tmp_path, "--name", "cmp", "--no-progress",
    )  # fmt: skip
    assert "lora-qv" in result.stdout and (tmp_path / "cmp.json").exists()


def test_compare_lora_defaults_yield_to_the_users_methods_and_seeds(monkeypatch):
    import runpy

    import benchmarks.run

    passed = []
    monkeypatch.setattr(benchmarks.run, "main", passed.append)
    for argv, methods, seeds in [
        ([], ["zero-shot", "residual*", "residual", "lora-qv"], [0]),
        (["--methods", "residual", "coarse", "--seeds", "3", "4"], ["residual", "coarse"], [3, 4]),
    ]:
        monkeypatch.setattr(sys, "argv", ["compare_lora.py", "--preset", "dinov2-mnist", *argv])
        runpy.run_path(str(ROOT / "examples" / "compare_lora.py"), run_name="__main__")
        args = benchmarks.run.parse_args(passed.pop())
        assert (args.methods, args.seeds) == (methods, seeds), argv


def _repository_files() -> set[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--modified", "--exclude-standard"], capture_output=True, text=True, cwd=ROOT
    )
    return set(listed.stdout.split())


def test_examples_never_write_into_the_repository(tiny_assets):
    before, docs = _repository_files(), (ROOT / "docs" / "unit_decomposition.png").read_bytes()
    quick = run(
        sys.executable, "examples/quickstart.py", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"],
        "--train-samples", "40", "--test-samples", "16", "--epochs", "1",
    )  # fmt: skip
    saved_to = Path(quick.stdout.strip().splitlines()[-1].removeprefix("adapter saved to "))
    assert (saved_to / "adapter_config.json").exists() and ROOT not in saved_to.parents
    plot = run(
        sys.executable, "examples/plot_units.py", "--model", tiny_assets["dinov2"], "--dataset", tiny_assets["dataset"],
        "--images", "8",
    )  # fmt: skip
    figure = Path(plot.stdout.split()[1].rstrip(";"))
    assert figure.read_bytes()[:4] == b"\x89PNG" and ROOT not in figure.parents
    assert _repository_files() == before and (ROOT / "docs" / "unit_decomposition.png").read_bytes() == docs
