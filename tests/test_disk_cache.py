"""The unit cache on disk: the same training as in memory, any process layout read back, kill -9 resumed."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

from peft_residual import (
    CentroidClassifier,
    ResiDualConfig,
    collect_units,
    encode_dataset,
    fit_residual_bases,
    train_residual,
)
from peft_residual.data import ShardLayout
from peft_residual.training.cache import EncodeOptions
from peft_residual.training.disk_cache import DiskUnitCache, ShardWriter, encode_to_disk

from .conftest import images, make_model
from .scripts import encode_tiny
from .scripts.count_images import count_images

SCRIPTS = Path(__file__).resolve().parent / "scripts"


@pytest.fixture(scope="module")
def tiny_run():
    n = 200
    x, y = images(n, seed=3), torch.arange(n) % 4
    data = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "label": y.tolist()}).with_format("torch")
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=4, units="heads+mlps"))
    fit_residual_bases(model, [{"pixel_values": x[i : i + 64]} for i in range(0, n, 64)], progress=False)
    classifier = CentroidClassifier.from_model(model, [{"pixel_values": x, "label": y}], list("abcd"), progress=False)
    return model, classifier, data


def trained(tiny_run, **options):
    model, classifier, data = tiny_run
    model = copy.deepcopy(model)
    result = train_residual(model, classifier, data, max_epochs=3, patience=3, batch_size=32, progress=False, **options)
    return model.base_model.readout.lambdas("default").detach(), result


@pytest.mark.parametrize("options", [{"cache": "disk"}, {"max_cache_bytes": 1}], ids=["disk", "auto-over-budget"])
def test_disk_cache_trains_the_same_bits_as_the_memory_cache(tiny_run, tmp_path, options):
    in_memory, memory_result = trained(tiny_run, cache=True)
    on_disk, disk_result = trained(tiny_run, cache_dir=tmp_path, **options)
    assert (memory_result.cache_location, disk_result.cache_location) == ("memory", "disk")
    assert torch.equal(on_disk, in_memory)
    assert disk_result.history == memory_result.history
    assert (tmp_path / "train" / "progress.r0.json").exists()  # it did go to disk, in cache_dir


def test_a_temporary_disk_cache_is_removed_with_it(tiny_run):
    model, _, data = tiny_run
    cache = encode_to_disk(model, data, None, "temporary", options=EncodeOptions(batch_size=32, progress=False))
    directory = cache.directory
    assert directory.is_dir() and len(cache) == len(data)
    del cache
    assert not directory.exists()


def test_rows_written_by_several_processes_read_back_in_data_set_order(tmp_path):
    """Process ``r`` encodes batches ``r, r + world, ...`` (of any sizes, as a streamed pass records them); the
    reader finds every image's row in any layout."""
    sizes, widths = (8, 8, 5, 8, 1, 8, 8, 4), {"scores": 3, "offset": 2}
    size = sum(sizes)
    scores = torch.randn(size, 3)
    offset, labels = torch.randn(size, 2), torch.arange(size)
    for world in (1, 2, 3):
        directory = tmp_path / f"world{world}"
        writers = [ShardWriter(directory, rank, "x", widths) for rank in range(world)]
        for step, indices in enumerate(torch.arange(size).split(sizes)):
            writers[step % world].append(scores[indices], offset[indices], labels[indices])
        cache = DiskUnitCache(directory, ShardLayout(sizes, world), widths)
        order = torch.randperm(size)
        got_scores, got_offset, got_labels = cache.rows(order)
        assert torch.equal(got_scores, scores[order]) and torch.equal(got_offset, offset[order])
        assert torch.equal(got_labels, labels[order]) and torch.equal(cache.labels, labels)


def test_an_encoding_killed_with_sigkill_resumes_at_its_last_complete_shard(tmp_path):
    directory = tmp_path / "cache"
    command = [sys.executable, str(SCRIPTS / "encode_tiny.py"), str(directory), "0.3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress, deadline = directory / "progress.r0.json", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["rows"] >= 3 * encode_tiny.BATCH:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = json.loads(progress.read_text())
    assert not committed["done"] and 0 < committed["rows"] < encode_tiny.SIZE, process.stderr.read().decode()

    model, data = encode_tiny.build()
    seen: list[int] = []
    handle = count_images(seen)
    try:
        resumed = encode_tiny.encode(model, data, directory)
    finally:
        handle.remove()
    assert sum(seen) == encode_tiny.SIZE - committed["rows"]  # only the images after the last complete shard
    fresh = encode_tiny.encode(model, data, tmp_path / "fresh")
    everything = torch.arange(encode_tiny.SIZE)
    for got, expected in zip(resumed.rows(everything), fresh.rows(everything), strict=True):
        assert torch.equal(got, expected)  # scores, offsets and labels, bit for bit
    assert json.loads(progress.read_text())["done"]


def test_a_finished_cache_is_reused_and_another_encodings_is_replaced(tmp_path, caplog):
    model, data = encode_tiny.build()
    first = encode_tiny.encode(model, data, tmp_path)
    seen: list[int] = []
    handle = count_images(seen)
    try:
        again = encode_tiny.encode(model, data, tmp_path)
        assert sum(seen) == 0 and torch.equal(again.rows(torch.arange(5))[0], first.rows(torch.arange(5))[0])
        encode_to_disk(
            model, data, tmp_path, "another", options=EncodeOptions(batch_size=encode_tiny.BATCH, progress=False)
        )
    finally:
        handle.remove()
    assert sum(seen) == encode_tiny.SIZE and "another encoding" in caplog.text


def test_streamed_data_sets_train_like_their_map_style_copy(tiny_run):
    """An IterableDataset of examples (``streaming=True``) and a plain generator of batches are recorded once and
    train to the same bits as the same images from a map-style data set."""
    model, classifier, data = tiny_run
    train, val = data.select(range(160)), data.select(range(160, 200))
    options = {"max_epochs": 2, "patience": 2, "batch_size": 32, "progress": False}
    reference = copy.deepcopy(model)
    train_residual(reference, classifier, train, val, **options)
    streamed = copy.deepcopy(model)
    seen: list[int] = []
    handle = count_images(seen)
    try:
        batches = ({"pixel_values": b["pixel_values"], "label": b["label"]} for b in val.iter(batch_size=32))
        train_residual(streamed, classifier, train.to_iterable_dataset(), batches, **options)
    finally:
        handle.remove()
    assert sum(seen) == 200  # every image through the backbone once
    expected = reference.base_model.readout.lambdas("default")
    assert torch.equal(streamed.base_model.readout.lambdas("default"), expected)


def test_every_phase_on_stored_units_shows_progress(tiny_run, capfd):
    """Fitting and caching from stored units run no backbone but take minutes at scale: each shows a bar."""
    model, _, data = tiny_run
    model = copy.deepcopy(model)
    units = collect_units(model, DataLoader(data, batch_size=64), desc="Train units")
    fit_residual_bases(model, units)
    encode_dataset(model, units)
    err = capfd.readouterr().err
    assert "Train units: 100%" in err and "img/s" in err  # images per second, with the total known
    assert "ResiDual PCA (recorded units): 100%" in err and "Caching units: 100%" in err
