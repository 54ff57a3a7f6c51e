"""Encode a tiny data set into a disk unit cache, slowly, so that a test can kill it mid-way.

python tests/scripts/encode_tiny.py DIRECTORY SECONDS_PER_BATCH
"""

import sys
import time
from pathlib import Path

import datasets
import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from peft_residual import ResiDualConfig, fit_residual_bases
from peft_residual.training.cache import EncodeOptions
from peft_residual.training.disk_cache import encode_to_disk
from tests.conftest import images, make_model

SIZE, BATCH = 96, 8


def build():
    """The same fitted model and labelled images in every process."""
    torch.set_num_threads(1)
    x, y = images(SIZE, seed=5), torch.arange(SIZE) % 4
    data = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "label": y.tolist()}).with_format("torch")
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=4, units="heads+mlps"))
    fit_residual_bases(model, [{"pixel_values": x}], progress=False)
    return model, data


def encode(model, data, directory):
    return encode_to_disk(model, data, directory, "tiny", options=EncodeOptions(batch_size=BATCH, progress=False))


if __name__ == "__main__":
    directory, pause = sys.argv[1], float(sys.argv[2])
    model, data = build()
    model.base_model.arch.tower.register_forward_hook(lambda *_: time.sleep(pause))
    encode(model, data, directory)
