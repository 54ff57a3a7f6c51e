"""Fit a tiny adapter, save it twice into DIR (a new save, then an overwrite) and load it back; print "saved".

Used by the tests inside a private mount namespace, where DIR is a mount point or sits under a read-only parent.
"""

import sys
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from peft_residual import ResiDualConfig, embed_images, fit_residual_bases
from tests.conftest import images, loader, make_model

target = sys.argv[1]
model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=3))
fit_residual_bases(model, loader(), progress=False)
model.save_pretrained(target)
with torch.no_grad():
    next(p for name, p in model.named_parameters() if "residual_lambda" in name).add_(1.0)
model.save_pretrained(target)  # over the first: the files are replaced inside the mount
loaded = PeftModel.from_pretrained(make_model("dinov2"), target)
with torch.no_grad():
    torch.testing.assert_close(embed_images(loaded, images(2)), embed_images(model, images(2)))
print("saved")
