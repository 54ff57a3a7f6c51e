"""PEFT's image-classification recipe with ResiDual: a ``*ForImageClassification`` base, its classifier in
``modules_to_save``, trained end to end through the backbone by ``transformers.Trainer`` (no cache), with the usual
``compute_metrics``. ``--cached`` trains the same adapter and head with ``train_residual`` on the unit cache instead,
for comparison (one backbone pass instead of one per epoch).

With the Hub:
    python examples/trainer_image_classification.py --model facebook/dinov2-small --dataset ylecun/mnist
Offline, with local model and data set directories (e.g. from shared/assets/prepare.sh):
    python examples/trainer_image_classification.py --model ~/.cache/residual-assets/models/dinov2-small-imgfocus \\
        --dataset ~/.cache/residual-assets/datasets/mnist --image-size 98
"""

import argparse
import tempfile
import time

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments
from transformers.utils import logging as transformers_logging

import peft_residual
from peft_residual.data import class_names, image_loader, keep_freed_memory, load_image_dataset, prepare, sample

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="facebook/dinov2-small", help="a ViT or DINOv2 checkpoint")
parser.add_argument("--dataset", default="ylecun/mnist")
parser.add_argument("--image-column", default="image")
parser.add_argument("--image-size", type=int, default=None)
parser.add_argument("--train-samples", type=int, default=512)
parser.add_argument("--test-samples", type=int, default=256)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05, help="learning rate of the scales (AdamW)")
parser.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the classifier")
parser.add_argument("--cached", action="store_true", help="train with train_residual on the unit cache instead")
parser.add_argument("--output", help="directory for the adapter (default: a new temporary directory)")
args = parser.parse_args()
args.output = args.output or tempfile.mkdtemp(prefix="residual-trainer-")
keep_freed_memory()  # this process's forwards reuse the memory they free (glibc), as the CLI's do


def with_new_classifier(**labels) -> torch.nn.Module:
    """The model with a new classifier of these classes: transformers' load report would list its weights as
    missing, which is the point here, so only errors are shown while it loads."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return AutoModelForImageClassification.from_pretrained(args.model, num_labels=len(names), **labels)
    finally:
        transformers_logging.set_verbosity(verbosity)


# 1. data: a seeded draw, its first 10% for validation, images through the model's own processor
dataset = load_image_dataset(args.dataset)
pool = sample(dataset["train"], args.train_samples, seed=0)
names = class_names(pool)
train, val = peft_residual.holdout(prepare(pool, args.model, args.image_size, args.image_column), 0.1)
test = prepare(sample(dataset["test"], args.test_samples, seed=0), args.model, args.image_size, args.image_column)

# 2. the base with a classifier of these classes (a new, random one on a backbone checkpoint), and the adapter:
# ResiDual's scales plus the classifier, trained and saved with the adapter (PEFT's modules_to_save)
labels = dict(enumerate(names))
base = with_new_classifier(id2label=labels, label2id={name: i for i, name in labels.items()})
model = get_peft_model(base, peft_residual.ResiDualConfig.residual(modules_to_save=["classifier"]))

# 3. the PCA bases, and a head that starts at the class centroids, from one backbone pass over the training images
started = time.perf_counter()
train_units = peft_residual.collect_units(model, image_loader(train), desc="Train units")
peft_residual.fit_residual_bases(model, train_units)
centroids = peft_residual.default_classifier(model, names, kind="centroid", train_units=train_units)
embeddings, _ = peft_residual.base_embeddings(train_units)
peft_residual.LinearClassifier.from_classifier(centroids, embeddings).copy_into(model)  # the adapter's copy
print(f"bases and centroids: {time.perf_counter() - started:.1f} s")


def compute_metrics(prediction) -> dict[str, float]:
    # evaluate.load("accuracy") downloads its script from the Hub, which fails offline: accuracy with numpy
    logits, label_ids = prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == label_ids).mean())}


training_args = TrainingArguments(
    output_dir=f"{args.output}/trainer", per_device_train_batch_size=args.batch_size,
    per_device_eval_batch_size=64, num_train_epochs=args.epochs, eval_strategy="epoch", save_strategy="no",
    logging_steps=10, report_to=[], remove_unused_columns=False,  # the images are decoded on the fly
    label_names=["labels"],  # a PeftModel's forward takes **kwargs: name the labels for evaluation
    dataloader_num_workers=1, seed=0,
)  # fmt: skip
started = time.perf_counter()
if args.cached:  # 4b. the scales and the head on the unit cache: one more backbone pass, for the validation images
    val_units = peft_residual.collect_units(model, image_loader(val), desc="Val units")
    result = peft_residual.train_residual(
        model, centroids, train_units, val_units, max_epochs=args.epochs, patience=args.epochs, head="linear",
        head_lr=args.head_lr,
    )  # fmt: skip
else:  # 4a. through the backbone, one forward and backward per image and epoch: the scales and the classifier
    scales = model.base_model.readout.scales("default")  # the tuner's interface to its trainable scales
    head = [p for name, p in model.named_parameters() if "modules_to_save" in name and p.requires_grad]
    groups = [{"params": scales, "lr": args.lr}, {"params": head, "lr": args.head_lr}]
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=val, compute_metrics=compute_metrics,
        optimizers=(torch.optim.AdamW(groups), None),  # Trainer adds its linear schedule
    )  # fmt: skip
    trainer.train()
seconds = time.perf_counter() - started

# 5. test accuracy of the model's own logits, then the adapter saved and loaded back
evaluator = Trainer(model=model, args=training_args, eval_dataset=test, compute_metrics=compute_metrics)
accuracy = evaluator.evaluate()["eval_accuracy"]
how = "train_residual on the cache" if args.cached else "Trainer through the backbone"
print(f"{how}: {args.epochs} epochs in {seconds:.1f} s; test accuracy {100 * accuracy:.1f}%")
model.save_pretrained(args.output)
fresh = with_new_classifier()  # a new random head...
again = PeftModel.from_pretrained(fresh, args.output)  # ...replaced by the adapter's trained copy
x = torch.stack([test[i]["pixel_values"] for i in range(8)])
model.eval()
with torch.no_grad():
    same = torch.equal(again(pixel_values=x).logits.argmax(-1), model(pixel_values=x).logits.argmax(-1))
print(f"adapter (scales and classifier) saved to {args.output}; loaded back, same predictions: {same}")
