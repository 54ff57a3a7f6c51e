"""ResiDual against LoRA on the same model, data and classifier: a thin front to the benchmark harness.

    python examples/compare_lora.py --model ~/.cache/residual-assets/models/dinov2-small-imgfocus \\
        --dataset ~/.cache/residual-assets/datasets/mnist --image-size 98

Its methods and seed are defaults: `--methods` and `--seeds` given here replace them. The full comparison (linear
probe, coarse scaling, full fine-tuning, seeds, plots) is `python -m benchmarks.run`; see docs/benchmarks.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.run import main

if __name__ == "__main__":
    # the defaults first: argparse keeps an option's last value, so the user's --methods or --seeds win
    main(["--methods", "zero-shot", "residual*", "residual", "lora-qv", "--seeds", "0", *sys.argv[1:]])
