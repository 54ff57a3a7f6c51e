"""The user's path as fast as the benchmark's (issue 30, item 9): the CLI's process reuses the memory its forwards
free (glibc), and `peft-residual train` decodes its images in a DataLoader worker, with the same pixel values."""

import os
import platform
import subprocess
import sys

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from peft_residual import cli

# A forward's shape of memory use: 8 activations of 10 MB alive at once, then freed together, ten times over; prints
# the minor page faults of one round. With "cli", the CLI's main sets up the process first (and stops at a bad path).
ROUNDS = """
import resource, sys, torch
from peft_residual.cli import main
if sys.argv[1] == "cli":
    assert main(["fit", "--quiet", "--model", "/nonexistent", "--dataset", "/nonexistent", "--output", "out"]) == 2
def rounds(n):
    for _ in range(n):
        held = [torch.ones(10 * 2**18) for _ in range(8)]
        del held
rounds(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_train_decodes_every_image_once_in_a_worker_process(tiny_assets, tmp_path, monkeypatch):
    decoded = tmp_path / "decoded"  # one line per decoded image: the process that decoded it
    original = datasets.Image.decode_example

    def decode_example(self, value, token_per_repo_id=None):
        with open(decoded, "a") as log:  # appends from any process, forked workers included
            log.write(f"{os.getpid()}\n")
        return original(self, value, token_per_repo_id=token_per_repo_id)

    monkeypatch.setattr(datasets.Image, "decode_example", decode_example)
    model, dataset = tiny_assets["dinov2"], tiny_assets["dataset"]
    code = cli.main(
        ["train", "--quiet", "--model", str(model), "--dataset", str(dataset), "--epochs", "1",
         "--output", str(tmp_path / "trained")]
    )  # fmt: skip
    assert code == 0
    processes = decoded.read_text().split()
    assert str(os.getpid()) not in processes  # nothing decoded beside the backbone
    assert len(processes) == 96  # the 86 training and 10 validation images, once each


def test_the_cli_loader_gives_the_pixel_values_of_decoding_in_process(tiny_assets, tmp_path):
    model, dataset = tiny_assets["dinov2"], tiny_assets["dataset"]
    for size in ([], ["--image-size", "24"]):
        args = cli.build_parser().parse_args(
            ["train", "--model", str(model), "--dataset", str(dataset), "--batch-size", "40", *size,
             "--output", str(tmp_path)]
        )  # fmt: skip
        data = cli._prepared(args, cli._split(args, "train", None))
        loader = cli._loader(args, data)
        assert loader.num_workers == 1
        here = list(DataLoader(data, batch_size=args.batch_size))  # the loader before issue 30
        there = list(loader)
        assert [len(batch["label"]) for batch in there] == [40, 40, 16]
        for ours, before in zip(there, here, strict=True):
            assert torch.equal(ours["pixel_values"], before["pixel_values"])
            assert torch.equal(ours["label"], before["label"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap setting is glibc's")
def test_the_cli_process_reuses_the_pages_its_forwards_free(tmp_path):
    """With glibc's defaults the rounds fault in most of their 80 MB (20,000 pages) afresh each time, or part of it
    (some 2,000 pages), depending on what small allocations happen to pin the heap; the CLI's process reuses them."""
    result = subprocess.run(
        [sys.executable, "-c", ROUNDS, "cli"], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert float(result.stdout.split()[-1]) < 1_000
