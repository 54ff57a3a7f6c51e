"""Hub client steps for the HTTP tests, run as a subprocess so that HF_ENDPOINT/HF_TOKEN apply from the start.

    hub_client.py push BASE_DIR REPO_ID OUT [--private] [--scale S] [--save-local DIR]
    hub_client.py pull BASE_DIR REPO_ID OUT
Both write OUT/embeds.safetensors: the adapted embedding of fixed images.
"""

import argparse
import sys
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import peft_residual
from tests.conftest import images, loader

parser = argparse.ArgumentParser()
parser.add_argument("step", choices=["push", "pull"])
parser.add_argument("base")
parser.add_argument("repo_id")
parser.add_argument("out", type=Path)
parser.add_argument("--private", action="store_true")
parser.add_argument("--scale", type=float, default=1.0, help="multiply the fitted scales before pushing")
parser.add_argument("--save-local", type=Path)
args = parser.parse_args()

base = CLIPVisionModelWithProjection.from_pretrained(args.base).eval()
if args.step == "push":
    model = get_peft_model(base, peft_residual.ResiDualConfig(k=3))
    peft_residual.fit_residual_bases(model, loader(), progress=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "residual_lambda" in name:
                param.mul_(args.scale)
    if args.save_local:
        model.save_pretrained(args.save_local)
    model.push_to_hub(args.repo_id, private=args.private, training={"dataset": "random test images"})
else:
    model = PeftModel.from_pretrained(base, args.repo_id)
with torch.no_grad():
    embeds = model(pixel_values=images(4, seed=11)).image_embeds
args.out.mkdir(parents=True, exist_ok=True)
save_file({"embeds": embeds.contiguous()}, args.out / "embeds.safetensors")
