"""Train ResiDual scales across processes with Accelerate; the script is the same for one process or many.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py \\
        --model ~/.cache/residual-assets/models/dinov2-small-imgfocus \\
        --dataset ~/.cache/residual-assets/datasets/fashion-mnist --image-size 98 --output fmnist-residual

On a CPU-only machine the same line runs two processes over gloo. Each process runs the backbone over its share of
the images and keeps only those units; the PCA moments and class centroids are summed across processes, the unit
cache goes to disk beyond its budget (each process writing its part), the scale gradients are summed, and only the
main process writes files.
"""

import argparse

from peft import get_peft_model

import peft_residual
from peft_residual import default_accelerator, load_vision_model
from peft_residual.data import class_names, image_loader, keep_freed_memory, load_image_dataset, prepare, sample

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True)
parser.add_argument("--dataset", required=True)
parser.add_argument("--image-size", type=int, default=None)
parser.add_argument("--train-samples", type=int, default=3000)
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--output", required=True)
args = parser.parse_args()
keep_freed_memory()  # each process's forwards reuse the memory they free (glibc), as the CLI's do

accelerator = default_accelerator()
model = load_vision_model(args.model, image_size=args.image_size)  # open_clip and timm are built at that size
pool = sample(load_image_dataset(args.dataset, "train"), args.train_samples, seed=0)
names = class_names(pool)
pool = prepare(pool, args.model, args.image_size)
train, val = peft_residual.holdout(pool, 0.1)

# one backbone pass, shared among the processes, over the training and validation images feeds the centroids, the
# fit and the cache
train_units, val_units = (
    peft_residual.collect_units(model, image_loader(split), desc=desc, accelerator=accelerator)
    for split, desc in ((train, "Train units"), (val, "Val units"))
)
classifier = peft_residual.default_classifier(model, names, tokenizer_source=args.model, train_units=train_units)
peft_model = get_peft_model(model, peft_residual.ResiDualConfig.preset("residual*"))
peft_residual.fit_residual_bases(peft_model, train_units)
result = peft_residual.train_residual(
    peft_model, classifier, train_units, val_units, max_epochs=args.epochs, accelerator=accelerator,
    output_dir=args.output,
)  # fmt: skip
if accelerator.is_main_process:
    peft_model.save_pretrained(args.output)
    classifier.save_pretrained(f"{args.output}/classifier")
    print(f"{accelerator.num_processes} processes: best validation accuracy {100 * result.best_val_accuracy:.1f}%")
