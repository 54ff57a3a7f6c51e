"""``peft-residual``: fit, train, evaluate and push ResiDual adapters from the command line.

    peft-residual train --model openai/clip-vit-base-patch32 --dataset uoft-cs/cifar10 --image-column img \\
        --templates cifar10 --output cifar10-residual
    peft-residual eval --model openai/clip-vit-base-patch32 --adapter cifar10-residual --dataset uoft-cs/cifar10 \\
        --image-column img
    peft-residual push --model openai/clip-vit-base-patch32 --adapter cifar10-residual --repo-id me/cifar10-residual
    peft-residual rank-heads --model facebook/dinov2-small --dataset ylecun/mnist --samples 1000 --output heads/

Models and data sets are Hub ids or local directories (``save_pretrained`` / ``save_to_disk``); OpenCLIP and timm
models are named as their libraries spell them (hf-hub:ORG/NAME, ViT-B-32:openai, timm/NAME; see --model). Bad input
exits with status 2 and one line on stderr. Offline, set HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

# Only the standard library is imported here, so that --help and --version answer at once; each command imports
# what it needs.

PRESET_NAMES = ("residual", "residual*", "coarse")  # tuner.config.PRESETS, without importing torch for --help
ANALYSIS_SAMPLES = 2000  # rank-heads and analyze hold every unit of every image: the default --samples there
logger = logging.getLogger("peft_residual.cli")


class CliError(Exception):
    """Bad input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"peft-residual: error: {message}\n")
        sys.exit(2)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once: not for options without one (None, flags) or whose help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is value for value in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def _components(text: str) -> int | float | str:
    """``--k``: a positive count of components, a variance ratio in (0, 1) such as 0.9, or ``all``."""
    if text == "all":
        return text
    try:
        return _fraction(text) if "." in text else _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of components, a variance ratio in (0, 1) such as 0.9, or all; got {text!r}"
        ) from None


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _check_source(name: str, what: str) -> None:
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise CliError(f"no {what} at {name!r}: the path does not exist")


def _model(args: argparse.Namespace):
    from .data import load_vision_model
    from .models import architecture_of

    image_size = getattr(args, "image_size", None)
    try:
        model = load_vision_model(args.model, image_size=image_size)  # open_clip and timm are built at that size
    except OSError as error:
        raise CliError(f"cannot load model {args.model!r}: {str(error).splitlines()[0]}") from error
    patch = architecture_of(model).patch_size
    if image_size is not None and (image_size % patch or image_size < patch):
        raise CliError(
            f"--image-size {image_size} is not a multiple of the model's {patch}-pixel patches; "
            f"use e.g. {max(patch, round(image_size / patch) * patch)}"
        )
    from accelerate import PartialState

    return model.to(PartialState().device)  # the backbone runs where training will (a GPU when there is one)


def _split(args: argparse.Namespace, split: str, samples: int | None):
    from .data import as_image_classification, load_image_dataset, sample

    _check_source(args.dataset, "dataset")
    try:
        dataset = load_image_dataset(args.dataset, split)
    except (OSError, ConnectionError) as error:
        raise CliError(f"cannot load dataset {args.dataset!r}: {str(error).splitlines()[0]}") from error
    return sample(as_image_classification(dataset, args.image_column, args.label_column), samples, args.seed)


def _check_paths(args: argparse.Namespace) -> None:
    """Before any model work: every local source exists, a local adapter directory holds a readable adapter, and
    ``--output`` is a directory or does not exist yet."""
    for name in ("model", "dataset", "adapter", "classifier", "bases"):
        if getattr(args, name, None):
            _check_source(getattr(args, name), name)
    for name in ("adapter", "bases"):
        if getattr(args, name, None):
            _check_adapter(getattr(args, name))
    if args.command == "eval":
        _check_eval_classifier(args.classifier, args.adapter)
    output = getattr(args, "output", None)
    if output and Path(output).exists() and not Path(output).is_dir():
        raise CliError(f"--output {output!r} is a file; name a directory (new or existing) for the results")


def _check_eval_classifier(classifier: str | None, adapter: str) -> None:
    """The head eval reads, ``--classifier`` or the adapter's ``classifier/``, before any model loads."""
    from .hub import CLASSIFIER_DIR

    if classifier is None and not _looks_local(adapter):  # the Hub adapter's own classifier/, as push sends it
        from huggingface_hub import file_exists

        try:
            pushed = file_exists(adapter, f"{CLASSIFIER_DIR}/classifier.json")
        except _hub_errors() as error:
            raise _hub_failure(f"cannot read the adapter {adapter!r}", error, adapter) from error
        if not pushed:
            raise CliError(
                f"the Hub adapter {adapter} holds no classifier/ (pushed from fit, which writes bases only): train "
                f"its scales with `peft-residual train --bases {adapter}` and push that, or pass --classifier DIR"
            )
        return
    directory = Path(classifier) if classifier else Path(adapter) / CLASSIFIER_DIR
    if (directory / "classifier.json").is_file():
        return
    if classifier:
        raise CliError(f"no classifier at {classifier!r}: give a directory written by train (its classifier/)")
    raise CliError(
        f"{adapter} holds no classifier/ (fit writes bases only): train its scales with `peft-residual train --bases "
        f"{adapter}`, or pass --classifier DIR"
    )


def _prepared(args: argparse.Namespace, dataset):
    from .data import prepare

    return prepare(dataset, args.model, args.image_size, args.image_column, args.label_column)


def _config(args: argparse.Namespace):
    from .tuner import ResiDualConfig

    overrides = {"seed": args.seed} | ({"k": None if args.k == "all" else args.k} if args.k is not None else {})
    return ResiDualConfig.preset(args.method, **overrides)


def _loader(args: argparse.Namespace, dataset):
    """Images decoded in a worker process, off the backbone's heap (see ``image_loader``)."""
    from .data import image_loader

    return image_loader(dataset, batch_size=args.batch_size)


TRAINING_SUMMARY, CHECKPOINT_DIR = "training.json", "checkpoint"
TRAIN_RUN_FILES = ("classifier", TRAINING_SUMMARY, CHECKPOINT_DIR)  # the first is hub.CLASSIFIER_DIR (stdlib only here)
"""What ``train`` writes beside the adapter: its head, its summary and its checkpoint, all tied to its bases."""


def cmd_fit(args: argparse.Namespace) -> None:
    import shutil

    from peft import get_peft_model

    from .data import fit_residual_bases

    stale = [Path(args.output) / name for name in TRAIN_RUN_FILES if (Path(args.output) / name).exists()]
    if stale and not args.overwrite:  # eval would read that run's head against these bases' fresh scales
        raise CliError(
            f"--output {args.output} holds a train run ({', '.join(path.name for path in stale)}), which new bases "
            "would leave stale; choose another --output, or pass --overwrite to remove it"
        )
    model = get_peft_model(_model(args), _config(args))
    data = _prepared(args, _split(args, args.split, args.samples))
    report = fit_residual_bases(model, _loader(args, data), progress=not args.quiet)
    model.save_pretrained(args.output)
    for path in stale:  # only once the new bases are saved: a fit that fails leaves the run as it was
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    print(f"fitted {report.num_scales:,} scales on {report.num_samples} images; adapter saved to {args.output}")


def _classifier(args: argparse.Namespace, base, names: list[str], **train_data):
    """The frozen head: CLIP zero-shot from --templates, or class centroids of the training images."""
    from .classifiers import default_classifier

    templates = args.templates
    if templates and Path(templates).is_file():
        templates = [line for line in Path(templates).read_text().splitlines() if line.strip()]
    return default_classifier(
        base, names, tokenizer_source=args.model, templates=templates or "imagenet", kind=args.classifier,
        centroid_scale=args.centroid_scale, progress=not args.quiet, **train_data,
    )  # fmt: skip


def cmd_train(args: argparse.Namespace) -> None:
    from peft import get_peft_model

    from .data import class_names, collect_units, fit_residual_bases, holdout
    from .hub import CLASSIFIER_DIR
    from .training.trainer import check_resumable, run_settings, train_residual

    lr = args.lr if args.lr == "auto" else float(args.lr)
    head_lr = args.head_lr if args.head == "linear" else None
    settings = run_settings(lr, args.batch_size, args.epochs, args.patience, args.seed, head_lr)
    if not args.overwrite:  # another run's hyper-parameters are refused now, not after the backbone pass and the fit
        check_resumable(Path(args.output) / CHECKPOINT_DIR, settings)
    if args.bases:  # before the model loads and the backbone runs
        if args.k is not None:
            raise CliError("--k sets the components of bases fitted here; --bases brings its own, so drop --k")
        _check_fitted_size(args, args.bases)
    base = _model(args)
    pool = _split(args, args.split, args.samples)
    names = class_names(pool, args.label_column)
    train, val = holdout(_prepared(args, pool), args.val_fraction)
    # the one backbone pass: every image's unit pieces feed the centroids, the PCA fit and the training cache
    train_units, val_units = (
        collect_units(base, _loader(args, split), progress=not args.quiet, desc=f"{name} units")
        for name, split in (("Train", train), ("Val", val))
    )
    classifier = _classifier(args, base, names, train_units=train_units)
    if args.bases:  # the paper's protocol: bases fitted on a reference set, only the scales trained here
        model = _bases_from(args, base, train_units.image_size)
    else:
        model = get_peft_model(base, _config(args))
        fit_residual_bases(model, train_units, progress=not args.quiet)
    result = train_residual(
        model, classifier, train_units, val_units, lr=lr, batch_size=args.batch_size, max_epochs=args.epochs,
        patience=args.patience, seed=args.seed, output_dir=Path(args.output) / CHECKPOINT_DIR, progress=not args.quiet,
        resume=not args.overwrite, head=args.head, head_lr=args.head_lr,
    )  # fmt: skip
    model.save_pretrained(args.output)
    (result.head or classifier).save_pretrained(Path(args.output) / CLASSIFIER_DIR)  # the head eval reads
    summary = {"dataset": args.dataset, **model.peft_config["default"].training_summary}
    (Path(args.output) / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=1))
    picked = f" with lr {result.lr:.3g} (found by the range test)" if args.lr == "auto" else ""
    print(f"best validation accuracy {100 * result.best_val_accuracy:.1f}% at epoch {result.best_epoch} of "
          f"{result.epochs_run}{picked}; adapter and classifier saved to {args.output}")  # fmt: skip


def _check_fitted_size(args: argparse.Namespace, adapter: str) -> list[int] | None:
    """The image size ``adapter`` was fitted at, checked against ``--image-size`` before any model loads (an
    open_clip model built at another size would otherwise fail on its weights' fingerprint, not say this); without
    ``--image-size``, the images are resized to it, the only size the adapter's bases describe."""
    from .tuner import ResiDualConfig

    fitted = (ResiDualConfig.from_pretrained(adapter).base_signature or {}).get("image_size")
    if fitted and args.image_size is None and fitted[0] == fitted[1]:
        args.image_size = fitted[0]
        logger.info("--image-size %d: the size %s was fitted at", fitted[0], adapter)
    size = args.image_size
    if fitted and size is not None and [size] * 2 != list(fitted):
        given = f"these come out at {size}x{size}" if getattr(args, "bases", None) else f"--image-size is {size}"
        raise CliError(
            f"the adapter in {adapter} was fitted on {fitted[0]}x{fitted[1]} px images but {given}; pass "
            f"--image-size {fitted[0]}"
        )
    return fitted


def _bases_from(args: argparse.Namespace, base, image_size: tuple[int, int]):
    """The adapter in ``--bases``, trainable, on ``base``: its PCA bases are kept, not refitted."""
    model = _load_adapter(args.bases, base, is_trainable=True)  # refuses another base model
    fitted = (model.peft_config["default"].base_signature or {}).get("image_size")
    if fitted and list(image_size) != list(fitted):
        raise CliError(
            f"the bases in {args.bases} were fitted on {fitted[0]}x{fitted[1]} px images but these come out at "
            f"{image_size[0]}x{image_size[1]}; pass --image-size {fitted[0]}"
        )
    return model


def _hub_failure(what: str, error: BaseException, source: str | None = None) -> CliError:
    """One line for a Hub read or write that failed: ``what`` could not be done, why, and where the Hub was (its
    endpoint, or that offline mode is on). A local ``source`` failed locally: no Hub is named."""
    from huggingface_hub import constants

    where = ""
    if source is None or not _looks_local(source):
        offline = " (HF_HUB_OFFLINE is set: only files already cached)"
        where = offline if constants.HF_HUB_OFFLINE else f" (Hub at {constants.ENDPOINT})"
    return CliError(f"{what}: {str(error).splitlines()[0]}{where}")


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What reading from or writing to the Hub raises when it cannot: ``OSError`` (huggingface_hub's own errors, its
    offline mode) and the base of its HTTP client's errors (a refused connection is no ``OSError`` there)."""
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError, *HfHubHTTPError.__bases__)


def _check_adapter(source: str) -> None:
    """An adapter's config, read as loading will read it (a missing, malformed or truncated file is named, an
    unreachable Hub said in one line), before any model loads."""
    from .tuner import ResiDualConfig

    if _looks_local(source):
        if not (Path(source) / "adapter_config.json").is_file():
            raise CliError(f"{source} holds no adapter_config.json; give the directory written by fit or train")
    elif source.count("/") != 1:
        raise CliError(f"no adapter at {source!r}: no such directory, and a Hub adapter is named OWNER/NAME")
    try:
        ResiDualConfig.from_pretrained(source)
    except (ValueError, *_hub_errors()) as error:
        raise _hub_failure(f"cannot read the adapter {source!r}", error, source) from error


def _load_adapter(source: str, base, is_trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, source, is_trainable=is_trainable)


def cmd_eval(args: argparse.Namespace) -> None:
    from .classifiers import Classifier, LinearClassifier
    from .hub import CLASSIFIER_DIR
    from .inference import accuracy, embed_batches_of_adapters

    fitted_size = _check_fitted_size(args, args.adapter)
    model = _load_adapter(args.adapter, _model(args))
    try:  # --classifier, or the adapter's own classifier/ (in its directory, or pushed beside it to the Hub)
        head = [args.classifier] if args.classifier else [args.adapter, CLASSIFIER_DIR]
        classifier = Classifier.from_pretrained(*head)
    except _hub_errors() as error:
        raise _hub_failure(f"cannot read the classifier of {args.adapter!r}", error, args.adapter) from error
    pool = _split(args, args.split, args.samples)
    _check_class_names(classifier.class_names, pool, args.label_column, args.dataset)
    data = _prepared(args, pool)
    if fitted_size and list(data[0]["pixel_values"].shape[-2:]) != fitted_size:
        raise CliError(
            f"the adapter was fitted on {fitted_size[0]}x{fitted_size[1]} px images but this data comes out at "
            f"{tuple(data[0]['pixel_values'].shape[-2:])}; pass --image-size {fitted_size[0]}"
        )
    from .records import BASE

    features, labels = embed_batches_of_adapters(  # the base and the adapted embedding from one backbone pass
        model, _loader(args, data), [BASE, "default"], progress=not args.quiet,
        num_classes=classifier.num_classes, desc="Embeddings",
    )  # fmt: skip
    base, adapted = (accuracy(classifier(features[name]), labels) for name in (BASE, "default"))
    # a trained head was trained on the adapted embedding: on the base model's it is no baseline of its own
    label = "base model + trained linear head" if isinstance(classifier, LinearClassifier) else classifier.head_name
    print(f"{len(labels)} images: {label} {100 * base:.2f}%  ResiDual {100 * adapted:.2f}%")


def _check_class_names(names: list[str], dataset, label_column: str, source: str) -> None:
    """Refuse a classifier of other classes than the data set's ``ClassLabel`` names (the same count of classes
    would give a number that means nothing); a data set with bare integer labels has no names to compare."""
    from datasets import ClassLabel

    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel) and list(feature.names) != list(names):

        def shown(values: list[str]) -> str:
            return ", ".join(values[:4]) + (f", ... ({len(values)})" if len(values) > 4 else "")

        raise CliError(
            f"the classifier's classes ({shown(list(names))}) are not those of {source} ({shown(feature.names)}); "
            "evaluate on the data set it was trained for, or pass --classifier with one of this data set's"
        )


def cmd_rank_heads(args: argparse.Namespace) -> None:
    from .analysis.ranking import ranking_curves
    from .data import base_embeddings, class_names, collect_units
    from .models import architecture_of
    from .plots import ranking_plot

    model = _model(args)
    pool = _split(args, args.split, args.samples)
    names = class_names(pool, args.label_column)
    reference = collect_units(model, _loader(args, _prepared(args, pool)), progress=not args.quiet, desc="Reference")
    test_data = _prepared(args, _split(args, args.test_split, args.test_samples))
    test = collect_units(model, _loader(args, test_data), progress=not args.quiet, desc="Test")
    classifier = _classifier(args, model, names, train_features=base_embeddings(reference))
    curves = ranking_curves(
        reference.contributions(), reference.labels, test.contributions(), test.labels, classifier,
        architecture_of(model).unit_names,
    )  # fmt: skip
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "heads.json").write_text(json.dumps(curves, indent=1))
    ranking_plot(curves, output / "heads.png", f"{Path(args.model).name} on {Path(args.dataset).name}")
    top = curves["curves"]["S"]["mean"]
    print(f"full model {100 * curves['full_accuracy']:.1f}%; top heads by S, the rest mean-ablated: "
          + ", ".join(f"{100 * float(f):g}% {100 * acc[0]:.1f}%" for f, acc in top.items())
          + f"; written to {output}/heads.json and heads.png")  # fmt: skip


def _units(args: argparse.Namespace, model, dataset: str, desc: str):
    """One backbone pass over ``--samples`` images of ``dataset``'s ``--split``."""
    from .data import collect_units

    source = argparse.Namespace(**{**vars(args), "dataset": dataset})
    data = _prepared(source, _split(source, args.split, args.samples))
    return collect_units(model, _loader(args, data), progress=not args.quiet, desc=desc)


def cmd_analyze(args: argparse.Namespace) -> None:
    from . import analysis
    from .classifiers import text_tower
    from .models import architecture_of, load_tokenizer
    from .plots import dimension_plot, similarity_heatmap

    model = _model(args)
    names = architecture_of(model).unit_names
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    units = _units(args, model, args.dataset, "Units").contributions()
    dims = analysis.unit_dimensions(units, names, max_samples=args.max_samples, seed=args.seed)
    profile = analysis.layer_profile(dims)
    hunchback = {
        f"{estimate} {kind}": analysis.is_hunchback(profile[estimate][kind])
        for estimate in profile
        for kind in ("heads", "mlp")
    }
    report = {"units": dims, "layer_profile": profile, "hunchback": hunchback}
    (output / "intrinsic_dimension.json").write_text(json.dumps(report, indent=1))
    title = f"{Path(args.model).name} on {Path(args.dataset).name}"
    dimension_plot(profile, output / "intrinsic_dimension.png", title)
    print("hunchback (ID rising then falling with depth): "
          + ", ".join(f"{key} {'yes' if value else 'no'}" for key, value in hunchback.items()))  # fmt: skip
    if args.compare_dataset:
        other = _units(args, model, args.compare_dataset, "Units (compared)").contributions()
        spectra = analysis.unit_spectra(units, names), analysis.unit_spectra(other, names)
        matrix = analysis.similarity_matrix(*spectra, names)
        same = matrix.diagonal()
        (output / "spectral_similarity.json").write_text(
            json.dumps(
                {"names": names, "matrix": matrix.tolist(), "same_unit": dict(zip(names, same.tolist(), strict=True))}
            )
        )
        pair = (Path(args.dataset).name, Path(args.compare_dataset).name)
        similarity_heatmap(matrix, names, output / "spectral_similarity.png", "spectral similarity", pair)
        print(f"spectral similarity of each unit with itself across data sets: mean {float(same.mean()):.3f}, "
              f"min {float(same.min()):.3f} ({names[int(same.argmin())]})")  # fmt: skip
    if text_tower(model) is not None:
        bank = analysis.default_text_bank()
        if args.text_bank:
            bank = [line.strip() for line in Path(args.text_bank).read_text().splitlines() if line.strip()]
        texts = analysis.embed_texts(model, load_tokenizer(args.model), bank)
        spans = {
            name: [(bank[i], share) for i, share in analysis.text_span(units[:, unit], texts, args.text_steps)]
            for unit, name in enumerate(names)
            if ".head" in name
        }
        (output / "textspan.json").write_text(json.dumps(spans, indent=1))
        print(f"TextSpan descriptions of {len(spans)} heads written (meaningful only with real CLIP weights)")
    print(f"written to {output}")


def cmd_push(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .classifiers import Classifier
    from .hub import CLASSIFIER_DIR

    def pushing(step):
        try:
            return step()
        except _hub_errors() as error:
            raise _hub_failure("cannot push to the Hub", error) from error

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise CliError(f"--repo-id {args.repo_id!r} is no Hub repository id: {error}") from None
    # who is logged in, first: a Hub that cannot be reached, or a missing or refused token, is said before the model
    # loads (seconds to minutes), and nothing is created on the Hub for a push that then fails on the model
    pushing(lambda: HfApi(token=args.token).whoami())
    model = _load_adapter(args.adapter, _model(args))
    summary_path = Path(args.adapter) / TRAINING_SUMMARY
    training = json.loads(summary_path.read_text()) if summary_path.exists() else None
    head = Path(args.adapter) / CLASSIFIER_DIR  # the head eval reads beside the adapter goes with it
    head = Classifier.from_pretrained(head) if (head / "classifier.json").is_file() else None
    push = {"private": args.private, "token": args.token, "training": training, "classifier": head}
    url = pushing(lambda: model.push_to_hub(args.repo_id, **push))
    print(f"pushed to {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peft-residual", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('peft-residual')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or log lines, only the result")
    common.add_argument(
        "--model",
        required=True,
        help="a ViT as its library names it: transformers (CLIP, DINOv2, ViT, BLIP) Hub id or save_pretrained "
        "directory; open_clip hf-hub:ORG/NAME, NAME:TAG (a pair of open_clip.list_pretrained(), e.g. "
        "ViT-B-32:openai), NAME:WEIGHTS_FILE or a directory with open_clip_config.json; timm timm/NAME, "
        "hf-hub:ORG/NAME, a registry NAME[.TAG] or a save_for_hf directory",
    )

    def data_options(analysis: bool) -> _Parser:
        """The data options: those of fit, train and eval, or (``analysis``) of rank-heads and analyze, which hold
        every unit of every image (a default sample) and read no adapter (no fitted size)."""
        data = _Parser(add_help=False)
        data.add_argument("--dataset", required=True, help="Hub id or local save_to_disk directory")
        data.add_argument("--image-column", default="image", help="the data set's column of images")
        data.add_argument("--label-column", default="label", help="the data set's column of class labels")
        fitted = "" if analysis else "the size an --adapter or --bases was fitted at, else "
        data.add_argument(
            "--image-size", type=_positive_int,
            help=f"resize images to this square side (default: {fitted}the processor's)",
        )  # fmt: skip
        samples = {"default": ANALYSIS_SAMPLES, "help": "use this many images, drawn with --seed"}
        samples = samples if analysis else {"help": "use this many images, drawn with --seed (default: all)"}
        data.add_argument("--samples", type=_positive_int, **samples)
        data.add_argument("--batch-size", type=_positive_int, default=64, help="images per backbone batch and per step")
        data.add_argument("--seed", type=int, default=0, help="seeds the image draw, the split and the scales' init")
        return data

    data, analysis_data = data_options(analysis=False), data_options(analysis=True)
    method = _Parser(add_help=False)
    method.add_argument("--method", choices=PRESET_NAMES, default="residual", help="the paper's setting")
    method.add_argument(
        "--k", type=_components, help="override the components per unit: an int, a variance ratio such as 0.9, or all"
    )

    def command(name: str, parents: list, summary: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=parents, help=summary, description=summary, formatter_class=_Formatter)
        sub.set_defaults(run=run)
        return sub

    fit = command("fit", [common, data, method], "fit the PCA bases on images and save the adapter", cmd_fit)
    fit.add_argument("--split", default="train", help="the data set's split to fit the bases on")
    fit.add_argument("--output", required=True, help="directory for the adapter")
    fit.add_argument(
        "--overwrite", action="store_true",
        help="remove what a train run left in --output (classifier/, training.json, checkpoint/): stale for new bases",
    )  # fmt: skip

    head = _Parser(add_help=False)
    head.add_argument(
        "--classifier", choices=["zero-shot", "centroid"],
        help="the frozen head: CLIP's and BLIP's text embeddings of the class names, or the class centroids of the "
        "training images (default: zero-shot where the model has a text tower, else centroid)",
    )  # fmt: skip
    head.add_argument("--templates", help="template set (imagenet, cifar10, ...) or a file with one per line")
    head.add_argument("--centroid-scale", type=float, default=100.0, help="logit scale of the centroid head")

    train = command(
        "train", [common, data, method, head],
        "fit the bases (or take them from --bases), train the scales against a frozen classifier, save",
        cmd_train,
    )  # fmt: skip
    train.add_argument("--split", default="train", help="the split whose images train and validate")
    train.add_argument(
        "--bases",
        help="an adapter directory (or Hub id) from `fit` on a reference set: train its scales with no refit (its "
        "config replaces --method)",
    )
    train.add_argument("--val-fraction", type=_fraction, default=0.1, help="the first part of the images validates")
    train.add_argument("--epochs", type=_positive_int, default=30, help="at most this many epochs")
    train.add_argument(
        "--patience", type=_positive_int, default=5, help="stop after this many epochs without a better validation"
    )
    train.add_argument("--lr", default="0.8", help="learning rate, or 'auto' for an LR range test")
    train.add_argument(
        "--head", choices=["frozen", "linear"], default="frozen",
        help="frozen: train the scales against the classifier; linear: also train a linear head on the adapted "
        "embedding, starting from that classifier, saved as ADAPTER/classifier",
    )  # fmt: skip
    train.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the linear head (--head linear)")
    train.add_argument("--output", required=True, help="directory for the adapter, classifier and checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="start fresh even if --output holds another run's checkpoint"
    )

    evaluate = command("eval", [common, data], "zero-shot and ResiDual test accuracy of a saved adapter", cmd_eval)
    evaluate.add_argument("--adapter", required=True, help="adapter directory or Hub id")
    evaluate.add_argument("--classifier", help="classifier directory (default: ADAPTER/classifier)")
    evaluate.add_argument("--split", default="test", help="the split to evaluate on")

    rank = command(
        "rank-heads", [common, analysis_data, head],
        "rank heads by S, U, U|T and random; accuracy keeping the top 1 to 50 percent, the rest zero- or "
        f"mean-ablated ({ANALYSIS_SAMPLES} images unless --samples: every unit of every image is held)",
        cmd_rank_heads,
    )  # fmt: skip
    rank.add_argument("--split", default="train", help="reference images: the ranking, centroids and means")
    rank.add_argument("--test-split", default="test", help="images the curves are measured on")
    rank.add_argument(
        "--test-samples", type=_positive_int, default=ANALYSIS_SAMPLES, help="test images, drawn with --seed"
    )
    rank.add_argument("--output", required=True, help="directory for heads.json and heads.png")

    analyze = command(
        "analyze", [common, analysis_data],
        "per-unit intrinsic dimension and its depth profile; spectral similarity to another data set; TextSpan "
        f"({ANALYSIS_SAMPLES} images per data set unless --samples: every unit of every image is held)",
        cmd_analyze,
    )  # fmt: skip
    analyze.add_argument("--split", default="train", help="the split whose images are analysed")
    analyze.add_argument("--compare-dataset", help="also fit on this data set and compare the units' spectra")
    analyze.add_argument("--max-samples", type=_positive_int, default=2000, help="images per unit for TwoNN")
    analyze.add_argument("--text-bank", help="CLIP only: a file of descriptions, one per line (default: shipped)")
    analyze.add_argument("--text-steps", type=_positive_int, default=5, help="CLIP only: TextSpan texts per head")
    analyze.add_argument("--output", required=True, help="directory for the JSON reports and plots")

    push = command("push", [common], "upload a saved adapter with its ResiDual model card", cmd_push)
    push.add_argument("--adapter", required=True, help="adapter directory or Hub id")
    push.add_argument("--repo-id", required=True, help="the Hub repository to create or update, e.g. me/my-adapter")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    return parser


def _silence_libraries() -> None:
    """--quiet: no progress bars or advisory messages from the libraries underneath, only errors and results."""
    import datasets
    import huggingface_hub
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line of the CLI's own, not Python's ``file:line: category: message`` and a source line
    (which would point into the package or its entry script)."""
    kind = "warning" if category is UserWarning else category.__name__
    print(f"peft-residual: {kind}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # this package's progress notes at INFO; other libraries' INFO (httpx logs every Hub request) stays out
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("peft_residual").setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.quiet:
        _silence_libraries()
    if args.command == "train" and args.lr != "auto":
        try:
            float(args.lr)
        except ValueError:
            print(f"peft-residual: error: --lr must be a number or 'auto', got {args.lr!r}", file=sys.stderr)
            return 2
    from .data import keep_freed_memory
    from .errors import ResiDualInputError

    keep_freed_memory()  # this process is the CLI's: its forwards reuse the pages they free (glibc)
    try:
        _check_paths(args)
        with warnings.catch_warnings():  # restored on exit: main() may run inside another program
            warnings.showwarning = _show_warning
            args.run(args)
    except (CliError, ResiDualInputError, FileNotFoundError) as error:
        print(f"peft-residual: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
