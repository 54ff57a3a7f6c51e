"""Where a batch-1 adapted forward's extra time goes (issue 28), one thread: the median wall time of the bare model,
the adapted one and the adapted one with its adapter disabled (the wrappers' own cost), then the aten ops whose
self time the adapter adds, from ``torch.profiler`` (adapted minus bare, per forward).

    python -m benchmarks.readout_profile --model DIR/models/dinov2-small-imgfocus --image-size 98 --merged
"""

from __future__ import annotations

import argparse
import warnings

import torch
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile

from peft_residual import ResiDualConfig, fit_residual_bases, load_vision_model

from .measure import median_seconds

CONFIGS = {"k=64 heads": lambda: ResiDualConfig(k=64), "ResiDual": lambda: ResiDualConfig.preset("residual")}


def median_ms(forward, calls: int = 101) -> float:
    with torch.inference_mode():
        for _ in range(4):  # and median_seconds' own warm-up call
            forward()
        return median_seconds(forward, calls) * 1e3


def self_time_per_op(forward, calls: int = 30) -> dict[str, tuple[float, float]]:
    """Per aten op: self time in µs and calls, per forward."""
    with torch.inference_mode():
        for _ in range(5):
            forward()
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            for _ in range(calls):
                forward()
    return {e.key: (e.self_cpu_time_total / calls, e.count / calls) for e in profiled.key_averages()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local directory of the vision model")
    parser.add_argument("--image-size", type=int, default=98)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="ResiDual")
    parser.add_argument("--merged", action="store_true", help="merge_adapter() first")
    parser.add_argument("--rows", type=int, default=10, help="ops to list")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = args.image_size
    x = torch.randn(160, 3, size, size, generator=torch.Generator().manual_seed(0)) * 0.5
    model = get_peft_model(load_vision_model(args.model), CONFIGS[args.config]())
    with warnings.catch_warnings():  # random reference images, too few for all components: timing only
        warnings.simplefilter("ignore", UserWarning)
        fit_residual_bases(model, [x[i : i + 32] for i in range(0, len(x), 32)], progress=False)
    model.eval()
    if args.merged:
        model.merge_adapter()
    bare = load_vision_model(args.model).eval()
    one = x[:1]
    for _ in range(2):
        bare_ms, adapted_ms = median_ms(lambda: bare(pixel_values=one)), median_ms(lambda: model(pixel_values=one))
        with model.disable_adapter():
            disabled_ms = median_ms(lambda: model(pixel_values=one))
        print(f"median ms, batch 1: bare {bare_ms:.2f}  adapted {adapted_ms:.2f}  adapter disabled {disabled_ms:.2f}")
    adapted, plain = self_time_per_op(lambda: model(pixel_values=one)), self_time_per_op(lambda: bare(pixel_values=one))
    zero = (0.0, 0.0)
    added = {
        op: tuple(a - b for a, b in zip(adapted.get(op, zero), plain.get(op, zero), strict=True))
        for op in adapted.keys() | plain.keys()
    }
    form = "merged" if args.merged else "live"
    print(f"{args.config}, {form}: self time per forward added by the adapter (profiled, so slower than wall time)")
    for op, (micros, calls) in sorted(added.items(), key=lambda item: -item[1][0])[: args.rows]:
        print(f"  {op:48s} {micros:8.1f} µs  {calls:+.0f} calls")


if __name__ == "__main__":
    main()
