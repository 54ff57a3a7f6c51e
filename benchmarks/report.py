"""Benchmark outputs: a JSON record, a Markdown table and two matplotlib figures."""

from __future__ import annotations

import json
import platform
import statistics
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "schedulefree", "safetensors", "peft-residual")


def environment() -> dict:
    import os

    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "packages": {name: version(name) for name in PACKAGES},
    }


def summarise(records: list[dict]) -> list[dict]:
    """Per method: mean and spread (sample std over seeds, 0 for one seed) of accuracy and times."""
    by_method = defaultdict(list)
    for record in records:
        by_method[record["method"]].append(record)
    rows = []
    for method, runs in by_method.items():
        accuracies = [r["test_accuracy"] for r in runs]
        train = [r["seconds"]["pca"] + r["seconds"]["cache"] + r["seconds"]["train"] for r in runs]
        rows.append(
            {
                "method": method,
                "seeds": len(runs),
                "accuracy": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                "trainable_params": runs[0]["trainable_params"],
                "adapter_bytes": runs[0]["adapter_bytes"],
                "pca_s": statistics.mean(r["seconds"]["pca"] for r in runs),
                "cache_s": statistics.mean(r["seconds"]["cache"] for r in runs),
                "train_s": statistics.mean(r["seconds"]["train"] for r in runs),
                "total_s": statistics.mean(train),
                "epochs": statistics.mean(r["epochs"] for r in runs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "latency_ms": statistics.mean(r["latency_ms"] for r in runs if r["latency_ms"] is not None),
                "floor_s": statistics.mean(r["floor_seconds"] for r in runs) if runs[0].get("floor_seconds") else None,
            }
        )
    return rows


def markdown(rows: list[dict], title: str, frozen_forward_s: float | None = None) -> str:
    """The summary table; totals are also shown over one frozen forward of the training images (when timed) and
    over LoRA q,v (when it ran), both measured in the same run."""
    lora = next((r["total_s"] for r in rows if r["method"] == "lora-qv"), None)
    ratios = [("÷ frozen fwd", frozen_forward_s), ("÷ LoRA q,v", lora)]
    ratios = [(name, value) for name, value in ratios if value]
    lines = [
        f"### {title}",
        "",
        "| method | seeds | test acc. (mean ± std) | trainable params | adapter bytes | PCA s | cache s | train s "
        "| total s | " + "".join(f"{name} | " for name, _ in ratios) + "epochs | peak RSS MiB | latency@32 ms |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(ratios) + "---|---|---|",
    ]
    for r in rows:
        shown = "".join(f"{r['total_s'] / value:.3f} | " if r["total_s"] else "— | " for _, value in ratios)
        lines.append(
            f"| {r['method']} | {r['seeds']} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} "
            f"| {r['trainable_params']:,} | {r['adapter_bytes']:,} | {r['pca_s']:.1f} | {r['cache_s']:.1f} "
            f"| {r['train_s']:.1f} | {r['total_s']:.1f} | {shown}{r['epochs']:.1f} | {r['peak_rss_mib']:.0f} "
            f"| {r['latency_ms']:.1f} |"
        )
    if frozen_forward_s:
        lines += ["", f"One frozen forward over the training images: {frozen_forward_s:.1f} s."]
        floors = [f"{r['method']} {r['floor_s'] / frozen_forward_s:.3f}" for r in rows if r.get("floor_s")]
        if floors:
            lines += [
                "",
                "A lower bound on total ÷ frozen fwd, measured in the same run: the one backbone pass over the train "
                "and validation images plus only the float32 readout products of the epochs run, with no fit and no "
                f"other work (`benchmarks.measure.readout_products_seconds`): {', '.join(floors)}.",
            ]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], stem: Path, title: str) -> list[Path]:
    accuracy_path, time_path = stem.with_name(stem.name + "_accuracy.png"), stem.with_name(stem.name + "_time.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        x = max(r["trainable_params"], 1)
        ax.errorbar(x, 100 * r["accuracy"], yerr=100 * r["accuracy_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (x, 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log; zero-shot drawn at 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(accuracy_path, dpi=120)
    plt.close(fig)

    trained = [r for r in rows if r["total_s"] > 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["method"] for r in trained]
    bottom = [0.0] * len(trained)
    for key, label in (("pca_s", "PCA fit"), ("cache_s", "feature cache"), ("train_s", "training")):
        values = [r[key] for r in trained]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("wall time per run (s)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(time_path, dpi=120)
    plt.close(fig)
    return [accuracy_path, time_path]


def write(out_dir: Path, name: str, payload: dict, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(payload["records"])
    payload = {**payload, "summary": rows, "environment": environment()}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=1))
    md_path = out_dir / f"{name}.md"
    md_path.write_text(markdown(rows, title, payload.get("frozen_forward_train_s")))
    accuracy_png, time_png = plots(rows, out_dir / name, title)
    return {"json": json_path, "markdown": md_path, "accuracy_png": accuracy_png, "time_png": time_png}


def mean_and_spread(accuracies: list[float]) -> str:
    """``"mean ± std"`` in percent over seeds (std 0 for one seed)."""
    values = [100 * a for a in accuracies]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def write_study(
    out_dir: Path, name: str, command: str, rows: list[dict], records: list[dict], lines: list[str]
) -> dict:
    """A one-factor study's JSON (rows, records, command, environment) and Markdown table, printed too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "rows": rows, "records": records, "environment": environment()}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload
