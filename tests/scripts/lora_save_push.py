"""Save and push a seeded tiny LoRA adapter, with or without importing peft_residual first.

lora_save_push.py OUT REPO_ID [--import-residual]
"""

import argparse

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("repo_id")
parser.add_argument("--import-residual", action="store_true")
args = parser.parse_args()
if args.import_residual:
    import peft_residual  # noqa: F401

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

torch.manual_seed(0)  # not tests.conftest: it imports peft_residual, which the plain run must not
vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, projection_dim=24)  # fmt: skip
base = CLIPVisionModelWithProjection(vision).eval()
model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
model.save_pretrained(args.out)
model.push_to_hub(args.repo_id)
print("residual registered:", "RESIDUAL" in __import__("peft").PeftType.__members__)
