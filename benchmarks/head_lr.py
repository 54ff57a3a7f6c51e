"""The trained head's learning rate in ResiDual + head (issue 29): one setup, every rate, on the same splits, seeds and
unit cache as ``benchmarks.run`` with the same arguments.

    python -m benchmarks.head_lr --preset dinov2-fashion-mnist --train-size 3000 --test-size 1000

Prints, per method and rate, the mean validation accuracy (what a rate would be chosen by) and the mean test accuracy
over the seeds, and writes benchmarks/results/head_lr_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from statistics import mean

from . import methods, run
from .presets import recorded_command

RATES = [1e-3, 3e-3, 1e-2, 3e-2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=RATES, help="head learning rates to try")
    own, rest = parser.parse_known_args(argv)
    args = run.parse_args(["--no-progress", *rest])
    bench, _ = run.build(args)
    rows = []
    for method in ("residual", "residual*"):
        for rate in own.rates:
            bench.head_lr = rate
            records = [methods.residual(bench, seed, method, head="linear") for seed in args.seeds]
            rows.append({
                "method": f"{method}{methods.HEAD_SUFFIX}", "head_lr": rate,
                "val_accuracy": mean(r["val_accuracy"] for r in records),
                "test_accuracy": mean(r["test_accuracy"] for r in records),
                "test_accuracies": [r["test_accuracy"] for r in records],
            })  # fmt: skip
            row = rows[-1]
            print(f"{row['method']:>15} head_lr {rate:g}: val {100 * row['val_accuracy']:.2f}  "
                  f"test {100 * row['test_accuracy']:.2f}", flush=True)  # fmt: skip
    name = args.name or f"{args.preset or 'custom'}_{args.train_size}"
    payload = {"command": recorded_command("benchmarks.head_lr", argv or sys.argv[1:]), "rows": rows}
    path = args.out / f"head_lr_{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print("wrote", path)
    return payload


if __name__ == "__main__":
    main()
