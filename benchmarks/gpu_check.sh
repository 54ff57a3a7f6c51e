#!/usr/bin/env bash
# Issue 28's checks on a real GPU, in one run of under 10 minutes on one GPU (each step has its own time limit):
#   1. the tests marked `cuda` (tests/test_cuda.py): per architecture the forward equals the CPU's, gradients and
#      bfloat16 run, training on the unit cache and under Accelerate works, and
#      torch.compile(mode="reduce-overhead") of the merged model equals eager with no CUDA graph skipped;
#   2. python -m benchmarks.overhead --device cuda: aten ops per forward, and bare vs adapted timings (synchronised);
#   3. python -m benchmarks.compiled: eager against reduce-overhead (CUDA graphs), bare and merged ResiDual.
# The model is real DINOv2-S/14 from $RESIDUAL_ASSETS/models/dinov2-small-imgfocus if it is there, else a random
# DINOv2-S-shaped model (its records are then named *_random_dinov2_*). Records go to benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh        # from any directory, in the project's environment
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: torch sees no CUDA GPU; nothing to check" >&2
  exit 1
fi
python -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
assets="${RESIDUAL_ASSETS:-$HOME/.cache/residual-assets}"
model="$assets/models/dinov2-small-imgfocus"
name=dinov2
if [ ! -f "$model/config.json" ]; then
  model="$(mktemp -d)/dinov2-small-random"
  name=random_dinov2
  echo "gpu_check: no $assets/models/dinov2-small-imgfocus; a random DINOv2-S-shaped model instead"
  python - "$model" <<'PY'
import sys

import torch
from transformers import Dinov2Config, Dinov2Model

torch.manual_seed(0)
config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                      patch_size=14, image_size=518)
Dinov2Model(config).save_pretrained(sys.argv[1])
PY
fi
started=$SECONDS
timeout 300 python -m pytest -q -m cuda tests/test_cuda.py
timeout 120 python -m benchmarks.overhead --model "$model" --device cuda \
  --output "benchmarks/results/overhead_${name}_cuda.json"
timeout 150 python -m benchmarks.compiled --model "$model" --device cuda --mode reduce-overhead \
  --output "benchmarks/results/compiled_${name}_cuda.json"
echo "gpu_check: all passed in $((SECONDS - started)) s"
