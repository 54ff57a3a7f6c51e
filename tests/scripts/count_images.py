"""Run a Python script, counting the images every vision tower embeds (each backbone forward's batch size).

    python tests/scripts/count_images.py COUNT.json script.py [ARGS...]

The count is a process-wide forward hook on the vision embedding modules, so it sees every backbone pass whatever
runs it (a bare model, a PeftModel, a unit recording); it is written to COUNT.json when the script ends.
"""

import atexit
import json
import runpy
import sys
from pathlib import Path

import torch

VISION_EMBEDDINGS = {"CLIPVisionEmbeddings", "Dinov2Embeddings", "ViTEmbeddings"}


def count_images(seen: list[int]):
    """Install the hook; ``seen`` gets each vision forward's batch size. Returns the hook's handle."""

    def hook(module, args, output):
        if type(module).__name__ in VISION_EMBEDDINGS:
            seen.append(int(output.shape[0]))

    return torch.nn.modules.module.register_module_forward_hook(hook)


if __name__ == "__main__":
    count_file, script, *arguments = sys.argv[1:]
    seen: list[int] = []
    count_images(seen)
    atexit.register(lambda: Path(count_file).write_text(json.dumps({"images": sum(seen), "forwards": len(seen)})))
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")
