"""Speed and memory only: ResiDual against LoRA on a randomly initialised CLIP ViT-B/32-shaped vision model at 224 px.

    python -m benchmarks.speed

Random weights and random images: the numbers are throughput and memory, never accuracy. Each method runs in its
own process, so peak RSS is that method's alone. Writes benchmarks/results/speed_clip_b32_random.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from peft_residual import CentroidClassifier, ResiDualConfig, embed_images, fit_residual_bases, train_residual

from .measure import PeakRSS, saved_bytes
from .report import environment, speed_table

METHODS = ("frozen-forward", "residual-cached", "residual-end-to-end", "lora-qv")


def _setup(images: int, seed: int = 0):
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig()).eval()  # the ViT-B/32 defaults, 224 px
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(images) % 10
    import datasets

    features = datasets.Features(
        {"pixel_values": datasets.Array3D((3, 224, 224), "float32"), "label": datasets.ClassLabel(10)}
    )
    data = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "label": labels.tolist()}, features=features)
    return model, x, labels, data.with_format("torch")


def _save_half(model, directory: Path) -> None:
    """Save a copy of the adapter with float16 bases (what ``basis_dtype="float16"`` would have fitted)."""
    half = copy.deepcopy(model)
    half.base_model.readout.cast_bases("default", torch.float16)
    half.save_pretrained(directory)


def measure(method: str, images: int, epochs: int, batch_size: int) -> dict:
    model, x, labels, data = _setup(images)
    classifier = CentroidClassifier.from_model(
        model, [{"pixel_values": x, "label": labels}], [str(i) for i in range(10)]
    )
    record = {"method": method, "images": images, "epochs": epochs, "batch_size": batch_size}
    batches = [{"pixel_values": x[i : i + 64], "label": labels[i : i + 64]} for i in range(0, images, 64)]
    with PeakRSS() as rss:
        if method == "frozen-forward":  # the yardstick: one no-grad pass of the base model over the images
            started = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    embed_images(model, batch["pixel_values"])
            record.update(pca_s=0.0, cache_s=0.0, train_s=time.perf_counter() - started, adapter_bytes=0)
            record.update(trainable_params=0, peak_rss_mib=rss.mib, total_s=record["train_s"], train_images_per_s=0)
            return record
        if method.startswith("residual"):
            cached = method == "residual-cached"
            peft_model = get_peft_model(model, ResiDualConfig(k=64))
            started = time.perf_counter()
            report = fit_residual_bases(peft_model, batches, progress=False, keep_units=cached)
            record.update(pca_s=time.perf_counter() - started, eigen_s=report.eigen_seconds)
            train = report.units if cached else data  # one pass: the fit's stored units are the training cache
            result = train_residual(
                peft_model, classifier, train, train, max_epochs=epochs, patience=epochs, batch_size=batch_size,
                cache=cached, progress=False,
            )  # fmt: skip
            record.update(cache_s=result.seconds["cache"], train_s=result.seconds["total"] - result.seconds["cache"])
            record["adapter_bytes_float16"] = saved_bytes(lambda d: _save_half(peft_model, d))
        else:
            peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
            params = [p for p in peft_model.parameters() if p.requires_grad]
            from schedulefree import AdamWScheduleFree

            optimizer = AdamWScheduleFree(params, lr=1e-3)
            started = time.perf_counter()
            for _ in range(epochs):
                optimizer.train()
                for i in range(0, images, batch_size):
                    logits = classifier(embed_images(peft_model, x[i : i + batch_size]))
                    torch.nn.functional.cross_entropy(logits, labels[i : i + batch_size]).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                optimizer.eval()  # validate every epoch on the same images, as train_residual does
                with torch.no_grad():
                    for i in range(0, images, batch_size):
                        classifier(embed_images(peft_model, x[i : i + batch_size]))
            record.update(pca_s=0.0, cache_s=0.0, train_s=time.perf_counter() - started)
    record["adapter_bytes"] = saved_bytes(peft_model.save_pretrained)
    record["trainable_params"] = peft_model.get_nb_trainable_parameters()[0]
    record["peak_rss_mib"] = rss.mib
    record["total_s"] = record["pca_s"] + record["cache_s"] + record["train_s"]
    record["train_images_per_s"] = images * epochs / record["train_s"]
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--only", choices=METHODS, help="run one method in this process and print its JSON")
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args.only, args.images, args.epochs, args.batch_size)))
        return
    records = []
    for method in METHODS:
        command = [sys.executable, "-m", "benchmarks.speed", "--only", method, "--images", str(args.images)]
        command += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        records.append(json.loads(output.strip().splitlines()[-1]))
        print(records[-1], flush=True)
    lines = [
        "### Speed only: random-weight CLIP ViT-B/32-shaped vision model, 224 px (no accuracy meaning)",
        "",
        f"{args.images} random images, {args.epochs} epochs, batch {args.batch_size}, one process per method; every "
        "method validates on the same images after each epoch (included in train s). frozen-forward is one no-grad "
        "pass of the base model over the images.",
        "",
        speed_table({"records": records}),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python -m benchmarks.speed " + " ".join(argv or sys.argv[1:]), "records": records}
    payload["environment"] = environment()
    (args.out / "speed_clip_b32_random.json").write_text(json.dumps(payload, indent=1))
    (args.out / "speed_clip_b32_random.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
