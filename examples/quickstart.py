"""Adapt a vision model to a labelled image data set with ResiDual; compare the frozen head's accuracy on the base
and the adapted embeddings (CLIP: the zero-shot text head; vision-only models: class centroids).

With the Hub (defaults: CLIP ViT-B/32 on CIFAR-10):
    python examples/quickstart.py
Offline, with local model and data set directories (e.g. from shared/assets/prepare.sh):
    python examples/quickstart.py --model ~/.cache/residual-assets/models/dinov2-small-imgfocus \\
        --dataset ~/.cache/residual-assets/datasets/fashion-mnist --image-size 98
"""

import argparse
import os
import sys
import tempfile

import torch
from peft import get_peft_model

import peft_residual
from peft_residual import load_vision_model
from peft_residual.data import class_names, image_loader, keep_freed_memory, load_image_dataset, prepare, sample

ASSETS = os.environ.get("RESIDUAL_ASSETS", "~/.cache/residual-assets")  # the assets directory, as the presets read it
OFFLINE = (
    f"python examples/quickstart.py --model {ASSETS}/models/dinov2-small-imgfocus "
    f"--dataset {ASSETS}/datasets/fashion-mnist --image-size 98"
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="openai/clip-vit-base-patch32")
parser.add_argument("--dataset", default="uoft-cs/cifar10")
parser.add_argument("--image-column", default=None, help="default: img for uoft-cs/cifar10, else image")
parser.add_argument("--image-size", type=int, default=None)
parser.add_argument("--train-samples", type=int, default=2000)
parser.add_argument("--test-samples", type=int, default=1000)
parser.add_argument("--templates", default="cifar10", help="prompt templates for CLIP zero-shot")
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--output", help="directory for the adapter (default: a new temporary directory)")
args = parser.parse_args()
image_column = args.image_column or ("img" if args.dataset == "uoft-cs/cifar10" else "image")
keep_freed_memory()  # this process's forwards reuse the memory they free (glibc), as the CLI's do

try:
    model = load_vision_model(args.model, image_size=args.image_size)  # open_clip and timm are built at that size
    dataset = load_image_dataset(args.dataset)
except OSError as error:  # no network and no local copy
    print(f"Cannot load {args.model} / {args.dataset} ({str(error).splitlines()[0]}). Offline, run:\n  {OFFLINE}")
    sys.exit(1)
args.output = args.output or tempfile.mkdtemp(prefix="residual-adapter-")  # once the model loads

# 1. data: a seeded draw, its first 10% for validation, images through the model's own processor
pool = sample(dataset["train"], args.train_samples, seed=0)
names = class_names(pool)
pool = prepare(pool, args.model, args.image_size, image_column)
train, val = peft_residual.holdout(pool, 0.1)
test = prepare(sample(dataset["test"], args.test_samples, seed=0), args.model, args.image_size, image_column)

# 2. the one backbone pass over the training and validation images (decoded in a worker process, batches of 64):
# their unit pieces feed everything below
train_units = peft_residual.collect_units(model, image_loader(train), desc="Train units")
val_units = peft_residual.collect_units(model, image_loader(val), desc="Val units")

# 3. the frozen classifier: CLIP's zero-shot text head, or class centroids for vision-only models
classifier = peft_residual.default_classifier(
    model, names, tokenizer_source=args.model, templates=args.templates, train_units=train_units
)

# 4. ResiDual: PCA bases on the training images, then train the scales (neither runs the backbone)
peft_model = get_peft_model(model, peft_residual.ResiDualConfig.residual())
peft_residual.fit_residual_bases(peft_model, train_units)
result = peft_residual.train_residual(peft_model, classifier, train_units, val_units, lr=0.8, max_epochs=args.epochs)


# 5. test accuracy of the frozen classifier on the base and the adapted embeddings, both from one backbone pass
test_loader = image_loader(test)
features, labels = peft_residual.embed_batches_of_adapters(peft_model, test_loader, ["__base__", "default"])
with torch.no_grad():
    base = peft_residual.accuracy(classifier(features["__base__"]), labels)
    adapted = peft_residual.accuracy(classifier(features["default"]), labels)
print(f"{classifier.head_name} {100 * base:.1f}%  ->  ResiDual {100 * adapted:.1f}%  ({result.epochs_run} epochs)")
peft_model.save_pretrained(args.output)
classifier.save_pretrained(f"{args.output}/classifier")
print(f"adapter saved to {args.output}")
