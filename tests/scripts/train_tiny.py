"""Train ResiDual scales on a tiny random DINOv2 and synthetic data; write the final scales to OUT/lambdas.safetensors.

Used by the tests as a subprocess: plain, under `accelerate launch`, and killed mid-run then restarted.
"""

import argparse
import sys
import time
from pathlib import Path

import datasets
import torch
from peft import get_peft_model
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from torch.utils.data import DataLoader

from peft_residual import (
    CentroidClassifier,
    ResiDualConfig,
    collect_units,
    default_accelerator,
    fit_residual_bases,
    train_residual,
)
from tests.conftest import images, make_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--checkpoint-dir")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each epoch")
parser.add_argument("--cache", choices=["true", "false", "disk"], default="true")
parser.add_argument("--cache-dir", help="where a disk cache goes (every process reads it)")
parser.add_argument(
    "--one-pass", action="store_true", help="record the units once, sharded across processes, and fit, take the "
    "centroids and train from them (a fixed split: the last 64 images validate)"
)  # fmt: skip
args = parser.parse_args()
# One intra-op thread in every process, so that each batch's float32 backbone arithmetic is the same whether one
# process runs or two (a GEMM may split its reductions differently with another thread count).
torch.set_num_threads(1)

n = 256
x, y = images(n, seed=3), torch.arange(n) % 4
features = datasets.Features(
    {"pixel_values": datasets.Array3D((3, 32, 32), "float32"), "label": datasets.ClassLabel(4)}
)
data = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "label": y.tolist()}, features=features)
data = data.with_format("torch")
model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=4, units="heads+mlps"))
accelerator = default_accelerator()
validation = None
if args.one_pass:
    data, validation = (
        collect_units(model, DataLoader(part, batch_size=32), accelerator=accelerator, progress=False)
        for part in (data.select(range(n - 64)), data.select(range(n - 64, n)))
    )
    fit_residual_bases(model, data, progress=False)
    classifier = CentroidClassifier.from_units(data, list("abcd"))
else:
    fit_residual_bases(model, [{"pixel_values": x[i : i + 64]} for i in range(0, n, 64)], progress=False)
    classifier = CentroidClassifier.from_model(model, [{"pixel_values": x, "label": y}], list("abcd"), progress=False)
initial = model.base_model.readout.lambdas("default").detach().clone()
result = train_residual(
    model,
    classifier,
    data,
    validation,
    max_epochs=args.epochs,
    patience=args.epochs,
    batch_size=32,
    cache={"true": True, "false": False, "disk": "disk"}[args.cache],
    cache_dir=args.cache_dir,
    output_dir=args.checkpoint_dir,
    accelerator=accelerator,
    progress=False,
    on_epoch_end=lambda record: time.sleep(args.sleep),
)
if accelerator.is_main_process:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    final = model.base_model.readout.lambdas("default").detach().contiguous()
    basis = model.base_model.readout.components("default").basis.contiguous()
    saved = {"lambdas": final, "initial": initial, "basis": basis, "centroids": classifier.weights.contiguous()}
    save_file(saved, out / "lambdas.safetensors")
    (out / "result.txt").write_text(
        f"{result.epochs_run} {result.best_val_accuracy} {accelerator.num_processes} {len(data)}\n"
    )
