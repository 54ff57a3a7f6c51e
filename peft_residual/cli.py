"""``peft-residual``: fit, train, evaluate and push ResiDual adapters from the command line.

    peft-residual train --model openai/clip-vit-base-patch32 --dataset uoft-cs/cifar10 --image-column img \\
        --templates cifar10 --output cifar10-residual
    peft-residual eval --model openai/clip-vit-base-patch32 --adapter cifar10-residual --dataset uoft-cs/cifar10 \\
        --image-column img
    peft-residual push --model openai/clip-vit-base-patch32 --adapter cifar10-residual --repo-id me/cifar10-residual

Models and data sets are Hub ids or local directories (``save_pretrained`` / ``save_to_disk``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.utils.data import DataLoader

from .architectures import load_vision_model
from .classifiers import CentroidClassifier, Classifier, ZeroShotClassifier
from .config import ResiDualConfig
from .data import class_names, load_image_dataset, prepare, sample
from .decomposition import embed_batches
from .pca import fit_residual_bases
from .trainer import accuracy, train_residual

METHODS = {
    "residual": ResiDualConfig.residual,
    "residual-star": ResiDualConfig.residual_star,
    "coarse": ResiDualConfig.coarse,
}


class CliError(Exception):
    """Bad input, reported as one line."""


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _check_source(name: str, what: str) -> None:
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise CliError(f"no {what} at {name!r}: the path does not exist")


def _model(args: argparse.Namespace):
    _check_source(args.model, "model")
    try:
        return load_vision_model(args.model)
    except OSError as error:
        raise CliError(f"cannot load model {args.model!r}: {str(error).splitlines()[0]}") from error


def _split(args: argparse.Namespace, split: str, samples: int | None):
    _check_source(args.dataset, "dataset")
    try:
        dataset = load_image_dataset(args.dataset, split)
    except (OSError, ConnectionError) as error:
        raise CliError(f"cannot load dataset {args.dataset!r}: {str(error).splitlines()[0]}") from error
    return sample(dataset, samples, args.seed)


def _prepared(args: argparse.Namespace, dataset):
    return prepare(dataset, args.model, args.image_size, args.image_column, args.label_column)


def _config(args: argparse.Namespace) -> ResiDualConfig:
    overrides = {"seed": args.seed}
    if args.k is not None:
        overrides["k"] = float(args.k) if "." in args.k else int(args.k)
    return METHODS[args.method](**overrides)


def _classifier(args: argparse.Namespace, model, dataset, names: list[str]) -> Classifier:
    """The frozen head: zero-shot text for CLIP unless asked otherwise, class centroids for vision-only models."""
    kind = args.classifier or ("zero-shot" if hasattr(model, "get_text_features") else "centroid")
    if kind == "zero-shot":
        if not hasattr(model, "get_text_features"):
            raise CliError(f"{args.model} has no text tower for a zero-shot classifier; use --classifier centroid")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        templates = args.templates
        if templates and Path(templates).is_file():
            templates = [line for line in Path(templates).read_text().splitlines() if line.strip()]
        return ZeroShotClassifier.from_clip(model, tokenizer, names, templates=templates or "imagenet")
    loader = DataLoader(dataset, batch_size=args.batch_size)
    return CentroidClassifier.from_model(model, loader, names, scale=args.centroid_scale)


def cmd_fit(args: argparse.Namespace) -> None:
    from peft import get_peft_model

    model = get_peft_model(_model(args), _config(args))
    data = _prepared(args, _split(args, args.split, args.samples))
    report = fit_residual_bases(model, DataLoader(data, batch_size=args.batch_size))
    model.save_pretrained(args.output)
    print(f"fitted {report.num_scales:,} scales on {report.num_samples} images; adapter saved to {args.output}")


def cmd_train(args: argparse.Namespace) -> None:
    from peft import get_peft_model

    base = _model(args)
    pool = _split(args, args.split, args.samples)
    names = class_names(pool, args.label_column)
    data = _prepared(args, pool)
    n_val = max(1, round(args.val_fraction * len(data)))
    val, train = data.select(range(n_val)), data.select(range(n_val, len(data)))
    classifier = _classifier(args, base, train, names)
    model = get_peft_model(base, _config(args))
    fit_residual_bases(model, DataLoader(train, batch_size=args.batch_size))
    lr = args.lr if args.lr == "auto" else float(args.lr)
    result = train_residual(
        model, classifier, train, val, lr=lr, batch_size=args.batch_size, max_epochs=args.epochs,
        patience=args.patience, seed=args.seed, output_dir=Path(args.output) / "checkpoint",
    )  # fmt: skip
    model.save_pretrained(args.output)
    classifier.save_pretrained(Path(args.output) / "classifier")
    summary = {
        "dataset": args.dataset, "best_validation_accuracy": result.best_val_accuracy, "epochs": result.epochs_run,
        "learning_rate": result.lr, "training_samples": len(train), "validation_samples": len(val),
    }  # fmt: skip
    (Path(args.output) / "training.json").write_text(json.dumps(summary, indent=1))
    print(f"best validation accuracy {100 * result.best_val_accuracy:.1f}% after {result.epochs_run} epochs; "
          f"adapter and classifier saved to {args.output}")  # fmt: skip


def _load_adapter(args: argparse.Namespace):
    from peft import PeftModel

    _check_source(args.adapter, "adapter")
    if _looks_local(args.adapter) and not (Path(args.adapter) / "adapter_config.json").exists():
        raise CliError(f"{args.adapter} holds no adapter_config.json; give the directory written by fit or train")
    return PeftModel.from_pretrained(_model(args), args.adapter)


def cmd_eval(args: argparse.Namespace) -> None:
    model = _load_adapter(args)
    classifier_dir = Path(args.classifier or Path(args.adapter) / "classifier")
    if not (classifier_dir / "classifier.json").exists():
        raise CliError(f"no classifier at {classifier_dir}; pass --classifier DIR (written by train)")
    classifier = Classifier.from_pretrained(classifier_dir)
    data = _prepared(args, _split(args, args.split, args.samples))
    base, labels = embed_batches(model, DataLoader(data, batch_size=args.batch_size), base=True)
    adapted, _ = embed_batches(model, DataLoader(data, batch_size=args.batch_size))
    base, adapted = accuracy(classifier(base), labels), accuracy(classifier(adapted), labels)
    print(f"{len(labels)} images: zero-shot {100 * base:.2f}%  ResiDual {100 * adapted:.2f}%")


def cmd_push(args: argparse.Namespace) -> None:
    model = _load_adapter(args)
    summary_path = Path(args.adapter) / "training.json"
    training = json.loads(summary_path.read_text()) if summary_path.exists() else None
    url = model.push_to_hub(args.repo_id, private=args.private, token=args.token, training=training)
    print(f"pushed to {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-residual", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("--model", required=True, help="Hub id or local directory of a CLIP or DINOv2 model")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--dataset", required=True, help="Hub id or local save_to_disk directory")
    data.add_argument("--image-column", default="image")
    data.add_argument("--label-column", default="label")
    data.add_argument("--image-size", type=int, help="resize images to this square side (default: the processor's)")
    data.add_argument("--samples", type=int, help="use this many images, drawn with --seed (default: all)")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--seed", type=int, default=0)
    method = argparse.ArgumentParser(add_help=False)
    method.add_argument("--method", choices=sorted(METHODS), default="residual")
    method.add_argument("--k", help="override the components per unit: an int, or a variance ratio such as 0.9")

    fit = commands.add_parser("fit", parents=[source, data, method], help="fit the PCA bases and save the adapter")
    fit.add_argument("--split", default="train")
    fit.add_argument("--output", required=True, help="directory for the adapter")
    fit.set_defaults(run=cmd_fit)

    train = commands.add_parser("train", parents=[source, data, method], help="fit the bases and train the scales")
    train.add_argument("--split", default="train")
    train.add_argument("--classifier", choices=["zero-shot", "centroid"], help="default: zero-shot for CLIP")
    train.add_argument("--templates", help="template set (imagenet, cifar10, ...) or a file with one per line")
    train.add_argument("--centroid-scale", type=float, default=100.0)
    train.add_argument("--val-fraction", type=float, default=0.1, help="the first part of the images validates")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--patience", type=int, default=5)
    train.add_argument("--lr", default="0.8", help="learning rate, or 'auto' for an LR range test")
    train.add_argument("--output", required=True, help="directory for the adapter, classifier and checkpoint")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", parents=[source, data], help="zero-shot and ResiDual test accuracy")
    evaluate.add_argument("--adapter", required=True, help="adapter directory or Hub id")
    evaluate.add_argument("--classifier", help="classifier directory (default: ADAPTER/classifier)")
    evaluate.add_argument("--split", default="test")
    evaluate.set_defaults(run=cmd_eval)

    push = commands.add_parser("push", parents=[source], help="upload an adapter with its model card")
    push.add_argument("--adapter", required=True, help="adapter directory")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    push.set_defaults(run=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CliError, ValueError, KeyError, TypeError, FileNotFoundError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"peft-residual: error: {str(message).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
