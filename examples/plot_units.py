"""Draw the unit decomposition of a model's output: how much each residual unit contributes, and that the units
sum to the output. Writes the figure to --output (default: unit_decomposition.png in a new temporary directory;
the copy in docs/ was made with --output docs/unit_decomposition.png).

    python examples/plot_units.py --model ~/.cache/residual-assets/models/dinov2-small-imgfocus \\
        --dataset ~/.cache/residual-assets/datasets/fashion-mnist --image-size 98
"""

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader

from peft_residual import Architecture, decompose_units, embed_images, load_vision_model
from peft_residual.data import load_image_dataset, prepare, sample

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True)
parser.add_argument("--dataset", required=True)
parser.add_argument("--image-size", type=int, default=None)
parser.add_argument("--images", type=int, default=64)
parser.add_argument("--output", type=Path, help="PNG path (default: in a new temporary directory)")
args = parser.parse_args()
args.output = args.output or Path(tempfile.mkdtemp(prefix="residual-units-")) / "unit_decomposition.png"

model = load_vision_model(args.model, image_size=args.image_size)  # open_clip and timm are built at that size
data = prepare(sample(load_image_dataset(args.dataset, "train"), args.images, seed=0), args.model, args.image_size)
pixel_values = next(iter(DataLoader(data, batch_size=args.images)))["pixel_values"]
units = decompose_units(model, pixel_values)
with torch.no_grad():
    output = embed_images(model, pixel_values)
error = float((units.contributions.sum(1) - output).abs().max() / output.abs().max())

arch = Architecture(model)
norms = units.contributions.norm(dim=-1).mean(0)  # mean norm of each unit's direct contribution
grid = torch.stack([norms[arch.heads_slice(i).start : arch.mlp_slice(i).stop] for i in range(arch.num_layers)])

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
image = left.imshow(grid.T, aspect="auto", cmap="viridis")
left.set_xlabel("layer")
left.set_yticks(range(arch.num_heads + 1), [f"head {h}" for h in range(arch.num_heads)] + ["MLP"])
left.set_title("mean ‖direct contribution‖ per unit")
fig.colorbar(image, ax=left)
share = norms / norms.sum()
kinds = {"embedding": share[0], "heads": 0.0, "MLPs": 0.0}
for i in range(arch.num_layers):
    kinds["heads"] += float(share[arch.heads_slice(i)].sum())
    kinds["MLPs"] += float(share[arch.mlp_slice(i)].sum())
right.bar(list(kinds), [float(v) for v in kinds.values()], color=["grey", "tab:blue", "tab:orange"])
right.set_ylabel("share of total contribution norm")
right.set_title(f"{arch.num_units} units sum to the output\n(max relative error {error:.1e})")
fig.suptitle(f"{Path(args.model).name}: output = embedding + Σ heads + Σ MLPs, each through the frozen final LN")
fig.tight_layout()
args.output.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.output, dpi=120)
print(f"wrote {args.output}; units sum to the output within {error:.1e} (relative)")
