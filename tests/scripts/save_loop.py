"""Save two versions of one adapter over DIR, alternating, until killed (for the atomic-save test).

Version v has config.seed == v and every scale equal to v, so a reader can tell whether files of one save belong
together. Prints "saving" once the first version is on disk.
"""

import sys
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from peft_residual import ResiDualConfig, fit_residual_bases
from tests.conftest import loader, make_model

target = sys.argv[1]
model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=3))
fit_residual_bases(model, loader(), progress=False)
scales = [p for name, p in model.named_parameters() if "residual_lambda" in name]


def save(version: int) -> None:
    model.peft_config["default"].seed = version
    with torch.no_grad():
        for param in scales:
            param.fill_(float(version))
    model.save_pretrained(target)


save(1)
print("saving", flush=True)
version = 1
while True:
    version = 3 - version
    save(version)
