"""Benchmark outputs: a JSON record, a Markdown table and two matplotlib figures."""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
from collections import defaultdict
from collections.abc import Callable
from importlib.metadata import version
from itertools import product
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


def run_table(payload: dict) -> str:
    """A :mod:`benchmarks.run` record as a Markdown table: per method, accuracy over seeds, size, the time charged
    (see ``methods.encoding_seconds``), and that total over one frozen forward of the training images and over LoRA
    q,v when both ran in the same run; then the passes' own times and the lower bound."""
    rows = summarise(payload["records"])
    frozen_forward_s = payload.get("frozen_forward_train_s")
    lora = next((r["total_s"] for r in rows if r["method"] == "lora-qv"), None)
    lora_head = next((r["total_s"] for r in rows if r["method"] == "lora+head"), None)
    ratios = [("÷ frozen fwd", frozen_forward_s), ("÷ LoRA q,v", lora), ("÷ LoRA+head", lora_head)]
    ratios = [(name, value) for name, value in ratios if value]
    lines = [
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
        frozen, units = payload.get("frozen_seconds", {}), payload["encode_seconds"]
        passes = [f"{frozen_forward_s:.1f} / {units['train']:.1f} s on the training images"]
        if "val" in frozen:
            passes.append(f"{frozen['val']:.1f} / {units['val']:.1f} s on the validation images")
        lines += ["", "Frozen forward / unit pass: " + "; ".join(passes) + "."]
        floors = [f"{r['method']} {r['floor_s'] / frozen_forward_s:.3f}" for r in rows if r.get("floor_s")]
        if floors:
            lines += [
                "",
                "A lower bound on total ÷ frozen fwd for this code, measured in the same run: the one backbone pass "
                "over the train and validation images plus only the float32 readout products of the epochs run, with "
                f"no fit and no other work (`benchmarks.measure.readout_products_seconds`): {', '.join(floors)}.",
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
    md_path.write_text(f"### {title}\n\n" + run_table(payload))
    accuracy_png, time_png = plots(rows, out_dir / name, title)
    return {"json": json_path, "markdown": md_path, "accuracy_png": accuracy_png, "time_png": time_png}


def mean_and_spread(accuracies: list[float]) -> str:
    """``"mean ± std"`` in percent over seeds (sample std), or the one value of a single seed."""
    values = [100 * a for a in accuracies]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


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


# Published tables: every table of results in README.md and docs/ is rendered here from the committed JSON, between
# `<!-- rendered: NAME -->` and `<!-- end rendered -->`. `python -m benchmarks.report` rewrites them;
# `--check` (and tests/test_published_tables.py) fails when a file differs from what its records render to.

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent


def pages() -> list[Path]:
    """The published pages: README.md and every Markdown file in docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


SHOWN = {
    "zero-shot": "zero-shot (centroids)",
    "residual*": "ResiDual\\*",
    "residual": "ResiDual",
    "residual*+head": "ResiDual\\* + linear head",
    "residual+head": "ResiDual + linear head",
    "coarse": "coarse (λ_h · u_h)",
    "lora-qv": "LoRA q,v",
    "lora+head": "LoRA q,v + linear head",
    "lora-all": "LoRA all linear",
    "linear-probe": "linear probe",
}
DATASETS = {"MNIST": "mnist", "F-MNIST": "fashion_mnist"}


def load(name: str) -> dict:
    """A committed record under benchmarks/results, by its path without ``.json``."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def _joined(values: list) -> str:
    """One value when all agree, else all of them: ``"997 / 1,037"``."""
    shown = [f"{v:,}" if isinstance(v, int) else str(v) for v in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def headline_table() -> str:
    """README: the default runs on both data sets, side by side."""
    runs = {label: load(f"default_{stem}") for label, stem in DATASETS.items()}
    summaries = {label: {r["method"]: r for r in summarise(p["records"])} for label, p in runs.items()}
    rows = []
    shown = ("zero-shot", "residual*", "residual", "residual*+head", "residual+head", "lora-qv", "lora+head")
    shown += ("linear-probe",)  # the methods with a head only once the records have them
    for method in [m for m in shown if all(m in summary for summary in summaries.values())]:
        per = [summaries[label][method] for label in runs]
        ratios = [
            f"{row['total_s'] / runs[label]['frozen_forward_train_s']:.2f}" if row["total_s"] else "—"
            for label, row in zip(runs, per, strict=True)
        ]
        accuracies = [[r["test_accuracy"] for r in runs[label]["records"] if r["method"] == method] for label in runs]
        rows.append(
            [
                SHOWN[method],
                *map(mean_and_spread, accuracies),
                _joined([row["trainable_params"] for row in per]),
                _joined([row["adapter_bytes"] for row in per]),
                " / ".join(ratios),
            ]
        )
    header = ["method", *(f"{label} acc. %" for label in runs), "trainable params", "adapter bytes"]
    return "\n".join(_table([*header, "÷ frozen forward (" + " / ".join(runs) + ")"], rows)) + "\n"


def _gain(accuracy: dict[str, float], method: str) -> str:
    """ResiDual + head's accuracy less ``method``'s, to 0.01 (one decimal showed +0.47 as +0.5 against a +0.5
    goal); "—" where the record lacks the method (not run)."""
    return f"{accuracy['residual+head'] - accuracy[method]:+.2f}" if method in accuracy else "—"


def head_goals_table() -> str:
    """docs/benchmarks.md: a trained head against issue 29's goals, at 540 and 2,700 training images."""
    rows = []
    for label, stem in DATASETS.items():
        for images, name in (("540", f"default_{stem}"), ("2,700", f"head_{stem}_3000")):
            summary = {r["method"]: r for r in summarise(load(name)["records"])}
            accuracy = {method: 100 * row["accuracy"] for method, row in summary.items()}

            lora = summary.get("lora+head")
            rows.append(
                [
                    label, images,
                    *(f"{accuracy[m]:.1f}" if m in accuracy else "—"
                      for m in ("linear-probe", "residual", "residual+head", "lora+head")),
                    *(_gain(accuracy, m) for m in ("linear-probe", "residual", "lora+head")),
                    f"{summary['residual+head']['total_s'] / lora['total_s']:.3f}" if lora else "—",
                ]
            )  # fmt: skip
    header = [
        "data set", "train images", "probe", "ResiDual", "ResiDual + head", "LoRA + head", "− probe (≥ +0.5)",
        "− ResiDual (≥ +0.5)", "− LoRA + head (≥ −1)", "time ÷ LoRA + head (≤ 0.1)",
    ]  # fmt: skip
    return "\n".join(_table(header, rows)) + "\n"


def basis_dtype_table() -> str:
    """docs/benchmarks.md: the default runs against the same runs with float16 bases, seed by seed."""
    rows = []
    for label, stem in DATASETS.items():
        runs = {dtype: load(f"default_{stem}{suffix}") for dtype, suffix in (("float32", ""), ("float16", "_fp16"))}
        for method in ("residual*", "residual"):
            found = {dtype: [r for r in p["records"] if r["method"] == method] for dtype, p in runs.items()}
            accuracies = {dtype: [r["test_accuracy"] for r in records] for dtype, records in found.items()}
            rows.append(
                [
                    f"{label} {SHOWN[method]}",
                    *(mean_and_spread(accuracies[dtype]) for dtype in runs),
                    "yes" if accuracies["float32"] == accuracies["float16"] else "no",
                    *(f"{found[dtype][0]['adapter_bytes']:,}" for dtype in runs),
                ]
            )
    header = ["run", "acc. % (float32 bases)", "acc. % (float16)", "every seed equal", "bytes (float32)"]
    return "\n".join(_table([*header, "bytes (float16)"], rows)) + "\n"


def overhead_table() -> str:
    payload = load("overhead_dinov2")
    batches = sorted({row["batch"] for row in payload["rows"]})
    configs = list(dict.fromkeys(row["config"] for row in payload["rows"]))
    cells = {(row["config"], row["batch"]): row for row in payload["rows"]}

    def cell(row: dict) -> str:  # the median paired ratio, and its quartiles where recorded
        spread = " ({:.3f}-{:.3f})".format(*row["ratio_quartiles"]) if "ratio_quartiles" in row else ""
        return f"{row['ratio']:.3f}×{spread}"

    rows = [[config, *(cell(cells[config, batch]) for batch in batches)] for config in configs]
    note = f"{payload['repeats']} pairs per cell, {payload['threads']} thread, torch {payload['torch']}."
    faulted = [
        f"{row['config']} at batch {row['batch']} ({faults['bare']:,.0f} / {faults['adapted']:,.0f})"
        for row in payload["rows"]
        if max((faults := row.get("page_faults_per_call", {"bare": 0, "adapted": 0})).values()) >= 1
    ]
    if "page_faults_per_call" in payload["rows"][0]:
        note += " Cells whose calls faulted in fresh pages (minor faults per call, bare / adapted): "
        note += ", ".join(faulted) if faulted else "none"
        note += "; fewer than one per call in the others."
    return "\n".join([*_table(["configuration", *(f"batch {batch}" for batch in batches)], rows), "", note]) + "\n"


def overhead_ops_table() -> str:
    """docs/benchmarks.md: aten ops of one batch-1 forward (``benchmarks.opcount``), bare and adapted."""
    ops = load("overhead_dinov2")["ops"]
    bare = ops["rows"][0]["by_op"]
    rows = []
    for row in ops["rows"]:
        extra = sorted(((n - bare.get(op, 0), op) for op, n in row["by_op"].items()), key=lambda e: (-e[0], e[1]))
        beyond = ", ".join(f"{n} `{op}`" for n, op in extra[:5] if n > 0) if row["form"] else ""
        label = f"{row['config']}, {row['form']}" if row["form"] else row["config"]
        rows.append([label, f"{row['ops']}", f"{row['ratio']:.3f}", beyond or "—"])
    note = (
        f"One batch-1 forward (`embed_images`, no gradients), {ops['device']}, torch {ops['torch']}; "
        f"{len(ops['excluded'])} metadata-only op names left out (`benchmarks.opcount.METADATA_ONLY`). "
        f"`{ops['command']}`"
    )
    return "\n".join([*_table(["model", "aten ops", "× bare", "most of the extra ops"], rows), "", note]) + "\n"


def multitask_table() -> str:
    """docs/benchmarks.md: N adapters from one backbone pass against N adapted forwards."""
    payload = load("multitask_dinov2")
    rows = [[row["run"], f"{row['ms']:,.0f}", f"{row['ratio_to_one_forward']:.3f}×"] for row in payload["rows"]]
    note = (
        f"{payload['adapters']} adapters, batch {payload['batch']}, {payload['image_size']} px, median of "
        f"{payload['repeats']} repeats, {payload['threads']} thread, torch {payload['torch']}. Largest difference "
        f"between embed_all_adapters and the separate forwards: {payload['max_abs_difference']}."
    )
    return "\n".join([*_table(["run", "ms", "vs one adapted forward"], rows), "", note]) + "\n"


def speed_table(payload: dict) -> str:
    """:mod:`benchmarks.speed`: each method in its own process on random CLIP-B/32-shaped weights."""
    records = payload["records"]
    lora = next(r for r in records if r["method"] == "lora-qv")
    forward = next(r for r in records if r["method"] == "frozen-forward")
    rows = []
    for r in records:
        half = f" / {r['adapter_bytes_float16']:,}" if "adapter_bytes_float16" in r else ""
        eigen = f" ({r['eigen_s']:.2f})" if "eigen_s" in r else ""
        rows.append(
            [
                r["method"],
                f"{r['trainable_params']:,}",
                f"{r['adapter_bytes']:,}{half}",
                f"{r['pca_s']:.1f}{eigen}",
                f"{r['cache_s']:.1f}",
                f"{r['train_s']:.1f}",
                f"{r['total_s']:.1f}",
                f"{r['total_s'] / forward['total_s']:.2f}",
                f"{r['total_s'] / lora['total_s']:.3f}",
                f"{r['peak_rss_mib']:,.0f}",
            ]
        )
    header = ["method", "trainable params", "adapter bytes (fp32 / fp16 bases)", "PCA s (eigen s)", "cache s"]
    header += ["train s", "total s", "÷ frozen forward", "÷ LoRA", "peak RSS MiB"]
    return "\n".join(_table(header, rows)) + "\n"


def memory_table(payload: dict) -> str:
    """:mod:`benchmarks.memory`: fit + cache of one pass, one process per row."""
    rows = [
        [
            f"{r['images']:,}",
            f"{r['fit_s']:.1f} ({r['eigen_s']:.2f})",
            f"{r['cache_s']:.1f}",
            f"{r['store_bytes'] / 2**20:,.0f}",
            "yes" if r["spilled"] else "no",
            f"{r['cache_bytes'] / 2**20:,.0f}",
            f"{r['peak_rss_mib']:,.0f}",
        ]
        for r in payload["records"]
    ]
    header = ["images", "fit s (eigen s)", "cache s", "unit store MiB", "spilled to disk", "training cache MiB"]
    return "\n".join(_table([*header, "peak RSS MiB"], rows)) + "\n"


def fidelity_table() -> str:
    """docs/paper.md: the conventions study on both data sets, one row per variant."""
    studies = {label: load(f"fidelity_{stem}")["rows"] for label, stem in DATASETS.items()}
    methods = ("zero-shot", "residual*", "residual", "coarse")
    variants = list(dict.fromkeys(row["variant"] for rows in studies.values() for row in rows))
    cells = {(label, row["variant"], row["method"]): row["accuracy"] for label, rows in studies.items() for row in rows}
    rows = [
        [variant, *(mean_and_spread(cells[k]) if k in cells else "—" for k in product(studies, [variant], methods))]
        for variant in variants
    ]
    header = ["variant", *(f"{label} {SHOWN[m].split(' (')[0]}" for label in studies for m in methods)]
    return "\n".join(_table(header, rows)) + "\n"


def heads_table() -> str:
    """docs/paper.md: top-k head accuracy with every other unit mean-ablated, per ranking and kept fraction."""
    curves = {label: load(f"heads_{stem}/heads")["curves"] for label, stem in DATASETS.items()}
    fractions = {label: list(next(iter(c.values()))["mean"]) for label, c in curves.items()}
    rows = [
        [ranking] + [mean_and_spread(curves[label][ranking]["mean"][f]) for label in curves for f in fractions[label]]
        for ranking in next(iter(curves.values()))
    ]
    header = ["ranking", *(f"{label} {100 * float(f):g} %" for label in curves for f in fractions[label])]
    reports = {label: load(f"heads_{stem}/heads") for label, stem in DATASETS.items()}
    full = " / ".join(f"{100 * r['full_accuracy']:.1f}" for r in reports.values())
    heads = " / ".join(f"{100 * r['all_heads']['mean']:.1f}" for r in reports.values())
    notes = f"Full model ({' / '.join(reports)}): {full}; all heads, every other unit mean-ablated: {heads}."
    return "\n".join([*_table(header, rows), "", notes]) + "\n"


def intrinsic_dimension_table() -> str:
    """docs/paper.md: mean intrinsic dimension per layer (TwoNN and linear, heads and MLPs) and the hunchback test."""
    reports = {label: load(f"analysis_{stem}/intrinsic_dimension") for label, stem in DATASETS.items()}
    layers = len(next(iter(reports.values()))["layer_profile"]["two_nn"]["heads"])
    rows = [
        [f"{label} {'heads (mean)' if unit == 'heads' else 'MLP'}, {'TwoNN' if estimator == 'two_nn' else 'linear'}"]
        + [
            f"{value:.0f}" if value == int(value) else f"{value:.1f}"
            for value in report["layer_profile"][estimator][unit]
        ]
        + ["yes" if report["hunchback"][f"{estimator} {unit}"] else "no"]
        for label, report in reports.items()
        for estimator in ("two_nn", "linear")
        for unit in ("heads", "mlp")
    ]
    return "\n".join(_table(["layer", *map(str, range(layers)), "hunchback"], rows)) + "\n"


def spectral_similarity_table() -> str:
    """docs/paper.md: how well each unit's spectrum on one data set matches the same unit's on the other, by layer."""
    same = load("analysis_mnist/spectral_similarity")["same_unit"]
    layers = sorted({int(name.split(".")[0].removeprefix("layer")) for name in same if name.startswith("layer")})

    def mean_of(kind: str, layer: int) -> str:
        values = [v for name, v in same.items() if name.startswith(f"layer{layer}.{kind}")]
        return f"{statistics.mean(values):.2f}"

    rows = [
        [shown, *(mean_of(kind, layer) for layer in layers)]
        for shown, kind in (("heads (mean)", "head"), ("MLP", "mlp"))
    ]
    notes = f"Mean over all {len(same)} units: {statistics.mean(same.values()):.2f}."
    return "\n".join([*_table(["layer", *map(str, layers)], rows), "", notes]) + "\n"


def ablation_table() -> str:
    """docs/paper.md: ResiDual's one-factor ablations on both data sets."""
    studies = {label: load(f"ablate_{stem}")["rows"] for label, stem in DATASETS.items()}
    keys = list(dict.fromkeys((row["factor"], row["level"]) for rows in studies.values() for row in rows))
    cells = {(label, row["factor"], row["level"]): row for label, rows in studies.items() for row in rows}
    rows = []
    for factor, level in keys:
        found = [cells.get((label, factor, level)) for label in studies]
        rows.append(
            [
                factor,
                level,
                *(mean_and_spread(row["accuracy"]) if row else "—" for row in found),
                _joined([row["scales"] for row in found if row]),
            ]
        )
    return "\n".join(_table(["factor", "level", *studies, "scales"], rows)) + "\n"


def scale_table(payload: dict) -> str:
    """:mod:`benchmarks.scale`: the user path at growing sizes, one row per size and process count."""
    rows = []
    for r in payload["records"]:
        per_k, disk = r["seconds_per_1k"], r["disk_bytes"]
        passed = "synthetic pieces" if r.get("synthetic_units") else f"{per_k['pass']:.2f}"
        rss = " / ".join(f"{mib:,.0f}" for mib in r.get("peak_rss_mib_per_process", [r["peak_rss_mib"]]))
        rows.append(
            [
                f"{r['images']:,} + {r['validation_images']:,}",
                str(r.get("processes", 1)),
                passed,
                *(f"{per_k[phase]:.2f}" for phase in ("fit", "cache", "train_epoch")),
                rss,
                f"{disk['unit_store'] / 2**20:,.0f} / {disk['training_cache'] / 2**20:,.0f}",
                r["cache_location"],
            ]
        )
    header = ["images (train + val)", "processes", "pass s/1k", "fit s/1k", "cache s/1k", "epoch s/1k"]
    header.append("peak RSS MiB (per process)")
    budget = payload["records"][0]["budget_bytes"] / 2**20
    note = f"Memory budget {budget:,.0f} MiB for the unit store and for the training cache alike."
    return "\n".join([*_table([*header, "disk MiB (units / cache)", "cache"], rows), "", note]) + "\n"


USER_PATH_RECORDS = ("user_path_before_3000", "user_path_cli_3000", "user_path_cli_54000")


def user_path_table() -> str:
    """docs/scale.md: :mod:`benchmarks.user_path`, `peft-residual train`'s pass (decoding included) against the bare
    forward on a ready batch, before issue 30 and now."""
    rows = []
    for name in USER_PATH_RECORDS:
        r = load(name)
        passed, bare, loop = r["pass"], r["bare"], r["bare_alone_glibc_defaults"]
        load_before, load_after = (minutes[0] for minutes in r["loadavg_before_after"])
        rows.append(
            [
                {"before": "before", "cli": "now"}[r["path"]],
                f"{r['images']:,}",
                f"{load_before:.1f} / {load_after:.1f}",
                f"{passed['images_per_s']:.1f}",
                f"{bare['images_per_s']:.1f}",
                f"{r['speed_ratio']:.2f} / {r['speed_ratio_paired']['median']:.2f}",
                f"{passed['cpu_ms_per_image']:.1f} / {bare['cpu_ms_per_image']:.1f}",
                f"{passed['minor_faults_per_image']:,.0f} ({passed['minor_faults_per_image_main']:,.0f} + "
                f"{passed['minor_faults_per_image_workers']:,.0f})",
                f"{loop['minor_faults_per_image']:,.0f}",
            ]
        )
    header = ["path", "images", "load average (1 min, before / after)", "pass images/s", "yardstick images/s"]
    header += ["ratio: total / pairs", "CPU ms/image: pass / yardstick", "faults/image: pass (main + worker)"]
    return "\n".join(_table([*header, "faults/image: bare loop, glibc defaults"], rows)) + "\n"


IMAGENET_TRAIN = 1_281_167
VIT_SHAPES = {  # hidden size, layers, heads, head size, output dimension (CLIP's projection)
    "ViT-B/16": (768, 12, 12, 64, 512),
    "ViT-L/14": (1024, 24, 16, 64, 768),
}


def storage_projection_table() -> str:
    """docs/scale.md: disk (or memory) that ImageNet-1k's training images need, from the shapes alone."""
    rows = []
    for name, (hidden, layers, heads, head_dim, out) in VIT_SHAPES.items():
        pieces = (2 * layers + 1) * hidden * 4  # the unit store: embedding, per layer heads and MLP, at CLS
        # a cached image: its scores, its offset and its label; a head has at most head_dim + 2 components under
        # the default conventions (Architecture.max_rank), an MLP as many as the output has dimensions
        k64 = (layers * heads * 64 + out) * 4 + 8
        residual = (layers * heads * (head_dim + 2) + layers * out + out) * 4 + 8
        rows.append([name, *(f"{IMAGENET_TRAIN * size / 1e9:,.0f}" for size in (pieces, k64, residual))])
    header = ["model", "unit store GB", "training cache GB, k=64 heads", "training cache GB, ResiDual"]
    return "\n".join(_table(header, rows)) + "\n"


GPUS, GPU_TFLOPS, DISK_GBPS, IMAGE_SIZE = 8, 100.0, 2.0, 224
"""Assumptions of the GPU projection (none measured here): 8 GPUs on one node, each sustaining 100 TFLOP/s on the
backbone's products (TF32 on an H100-class GPU, about a fifth of its dense peak), one shared NVMe volume reading or
writing 2 GB/s, images at 224 px."""


def gpu_projection_table() -> str:
    """docs/scale.md: time per phase for ImageNet-1k on one node of GPUs, from FLOP and byte counts of the shapes
    under :data:`GPU_TFLOPS` and :data:`DISK_GBPS`; each phase takes the slower of its compute and its disk."""
    rows = []
    for name, (hidden, layers, heads, head_dim, out) in VIT_SHAPES.items():
        patch = int(name.split("/")[1])
        tokens = (IMAGE_SIZE // patch) ** 2 + 1
        backbone = layers * (2 * tokens * 12 * hidden**2 + 4 * tokens**2 * hidden)  # products and attention
        units = 1 + layers * (heads + 1)
        # the fit and the cache push every unit through the norm and projection, then (heads) into head coordinates
        per_unit = units * hidden * out * 2 + layers * heads * out * (head_dim + 2) * 2
        store = (2 * layers + 1) * hidden * 4
        cache = (layers * heads * 64 + out) * 4 + 8  # k=64 heads
        epoch_flops = 3 * 2 * layers * heads * 64 * out  # readout, forward and the λ-gradient

        def seconds(flops: float, disk_bytes: float) -> float:
            return max(
                IMAGENET_TRAIN * flops / (GPUS * GPU_TFLOPS * 1e12), IMAGENET_TRAIN * disk_bytes / DISK_GBPS / 1e9
            )

        phases = {
            "pass": seconds(backbone, store),  # writes the unit store
            "fit": seconds(per_unit, store),  # reads it
            "cache": seconds(per_unit, store + cache),  # reads it, writes the cache
            "epoch": seconds(epoch_flops, cache),  # reads the cache
        }
        rows.append([name, f"{backbone / 1e9:.0f}", *(f"{value / 60:,.1f}" for value in phases.values())])
    header = ["model", "backbone GFLOP per image", "pass min", "fit min", "cache min", "epoch min (k=64 heads)"]
    note = (
        f"Assumed: {GPUS} GPUs at {GPU_TFLOPS:.0f} TFLOP/s each, one {DISK_GBPS:.0f} GB/s disk, {IMAGE_SIZE} px; "
        "loading and decoding the JPEGs is not modelled."
    )
    return "\n".join([*_table(header, rows), "", note]) + "\n"


RESIDUALS = ("residual*", "residual", "coarse")
"""The ResiDual variants of a ``benchmarks.paper`` cell, one column each per reference."""


def cell_accuracies(cell: dict, method: str, reference: str | None) -> list[float]:
    """Test accuracies of ``method``'s seeds in a grid ``cell`` (with bases from ``reference``; ``None``: no bases)."""
    return [r["test_accuracy"] for r in cell["records"] if r["method"] == method and r["reference"] == reference]


def grid_table(cells: list[dict], references: list[str]) -> list[str]:
    """The ``benchmarks.paper`` grid's lines, for its printout and for the docs alike."""
    header = ["model", "data set", "zero-shot", "linear probe"]
    header += [f"{method} ({reference})" for reference in references for method in RESIDUALS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in cells:
        columns = [("zero-shot", None), ("linear-probe", None)]
        columns += [(method, reference) for reference in references for method in RESIDUALS]
        row = [cell["model"], cell["dataset"]]
        row += [mean_and_spread(runs) if (runs := cell_accuracies(cell, *column)) else "-" for column in columns]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def paper_grid_table(name: str) -> str:
    """A ``benchmarks.paper`` grid: test accuracy per model and data set, ResiDual's columns per reference."""
    payload = load(name)
    references = [entry.partition("=")[0] for entry in payload["settings"]["references"]]
    return "\n".join(grid_table(payload["cells"], references)) + "\n"


def head_lr_table() -> str:
    """docs/benchmarks.md: ResiDual + head at each head rate (``benchmarks.head_lr``), both data sets at 2,700."""
    records = {"MNIST": load("head_lr_dinov2-mnist_3000"), "F-MNIST": load("head_lr_dinov2-fashion-mnist_3000")}
    rates = sorted({row["head_lr"] for payload in records.values() for row in payload["rows"]})
    rows = []
    for dataset, payload in records.items():
        for method in dict.fromkeys(row["method"] for row in payload["rows"]):
            by_rate = {row["head_lr"]: row for row in payload["rows"] if row["method"] == method}
            cells = [
                f"{100 * r['val_accuracy']:.1f} / {100 * r['test_accuracy']:.1f}" if (r := by_rate.get(rate)) else "—"
                for rate in rates
            ]
            rows.append([dataset, method, *cells])
    header = ["data set", "method", *(f"head_lr {rate:g}: val / test" for rate in rates)]
    return "\n".join(_table(header, rows)) + "\n"


PUBLISHED: dict[str, Callable[[], str]] = {
    "headline": headline_table,
    "default-mnist": lambda: run_table(load("default_mnist")),
    "default-fashion-mnist": lambda: run_table(load("default_fashion_mnist")),
    "fashion-mnist-3000-cached": lambda: run_table(load("fashion_mnist_3000_cached")),
    "head-mnist-3000": lambda: run_table(load("head_mnist_3000")),
    "head-fashion-mnist-3000": lambda: run_table(load("head_fashion_mnist_3000")),
    "head-goals": head_goals_table,
    "head-lr": head_lr_table,
    "fashion-mnist-3000-end-to-end": lambda: run_table(load("fashion_mnist_3000_end_to_end")),
    "speed": lambda: speed_table(load("speed_clip_b32_random")),
    "memory": lambda: memory_table(load("memory_clip_b32_random")),
    "basis-dtype": basis_dtype_table,
    "overhead": overhead_table,
    "overhead-ops": overhead_ops_table,
    "multitask": multitask_table,
    "fidelity": fidelity_table,
    "heads": heads_table,
    "intrinsic-dimension": intrinsic_dimension_table,
    "spectral-similarity": spectral_similarity_table,
    "ablations": ablation_table,
    "scale": lambda: scale_table(load("scale_clip_b32_random")),
    "paper-grid-offline": lambda: paper_grid_table("paper_dinov2_offline/paper_grid"),
    "storage-projection": storage_projection_table,
    "user-path": user_path_table,
    "gpu-projection": gpu_projection_table,
}
BLOCK = re.compile(r"(<!-- rendered: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end rendered -->)", re.S)


def render_page(text: str) -> str:
    """``text`` with every rendered block replaced by what its records render to now."""
    return BLOCK.sub(lambda m: m.group(1) + PUBLISHED[m.group("name")]() + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the published result tables from benchmarks/results.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page differs")
    args = parser.parse_args(argv)
    stale = []
    for path in pages():
        text = path.read_text()
        rendered = render_page(text)
        if rendered != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(rendered)
    verb = "differ from their records" if args.check else "rewritten"
    print(f"{', '.join(stale)}: {verb}" if stale else "every published table matches its record")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
