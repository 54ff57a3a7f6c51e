"""The user's path against the bare model: `peft-residual train`'s backbone pass, decoding included, against the
same model's forward on a ready tensor, interleaved in time.

    python -m benchmarks.user_path --model $RESIDUAL_ASSETS/models/dinov2-small-imgfocus \\
        --dataset $RESIDUAL_ASSETS/datasets/fashion-mnist --images 3000

The pass is the CLI's own code: the arguments come from its parser (``train --samples IMAGES --image-size
--batch-size``), the process is set up as ``cli.main`` sets it up (``keep_freed_memory``), then ``_model``,
``_split``, ``_prepared``, ``holdout`` and ``collect_units`` over ``_loader`` run for the training and the
validation part, as in ``cmd_train``. ``--path before`` runs the code before issue 30: glibc's default heap and a
DataLoader that decodes in this process.

The yardstick is the bare model's forward on one fixed batch of ready ``pixel_values`` (the pass's first images),
same model, size and batch, under ``torch.no_grad``, in a process of its own that runs only when told to while
this one waits:

- speed: every ``--every`` batches the pass pauses for ``--bare-batches`` batches of the yardstick, so that whatever
  else loads the machine hits both alike. That process keeps its freed memory as the CLI's does (the yardstick at
  its best; ``--yardstick-default-heap``: glibc's defaults), so ``before`` and ``cli`` are held to the same one.
  Reported: images over time of each side, and the median of the paired ratios (each stretch of the pass against
  the yardstick block right after it). A DataLoader worker may prefetch during a pause (at most two batches): the
  pause first sleeps 0.1 s, untimed, so that this decoding does not compete with the yardstick; the pass still
  finds those batches ready, an edge bounded by ``prefetch_bound`` (two batches' worth of the worker's measured CPU
  time per pause, over the pass's time).
- minor page faults per image: the same forward in a loop of its own (``--alone-batches``, after 3 warm-up
  batches) in a fresh process with glibc's defaults, before the pass: what a user's own loop gets, and what issue
  30 measured.

The pass's faults are this process's during the pass, less the pauses', plus any worker's (``RUSAGE_CHILDREN``,
counted once the worker has exited), reported apart as well; likewise CPU seconds per image (user + system), which
contention disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from peft_residual import cli
from peft_residual.data import collect_units, holdout, image_loader, keep_freed_memory, load_vision_model

from .presets import recorded_command


def _usage(who: int = resource.RUSAGE_SELF) -> tuple[int, float]:
    """Minor page faults and CPU seconds (user + system) so far."""
    usage = resource.getrusage(who)
    return usage.ru_minflt, usage.ru_utime + usage.ru_stime


class Yardstick:
    """The bare model's forward on one ready batch, in a process of its own that runs a block of batches when told
    to, while this one waits: interleaved in time, alone on the machine's share that this benchmark gets."""

    def __init__(self, model: str, tensor: Path, batches: int, keep_heap: bool):
        command = [sys.executable, "-m", "benchmarks.user_path", "--model", model, "--dataset", "-",
                   "--serve-yardstick", str(tensor)] + (["--keep-heap"] if keep_heap else [])  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"
        self.batches, self.images, self.seconds, self.faults, self.cpu = batches, 0, 0.0, 0, 0.0
        self.blocks: list[float] = []  # images/s of each block

    def block(self, batches: int | None = None) -> None:
        self.process.stdin.write(f"{batches or self.batches}\n")
        self.process.stdin.flush()
        done = json.loads(self.process.stdout.readline())
        self.images += done["images"]
        self.seconds += done["seconds"]
        self.faults += done["faults"]
        self.cpu += done["cpu"]
        self.blocks.append(done["images"] / done["seconds"])

    def close(self) -> dict:
        self.process.stdin.close()
        self.process.wait()
        return {
            "images": self.images,
            "images_per_s": self.images / self.seconds,
            "minor_faults_per_image": self.faults / self.images,
            "cpu_ms_per_image": 1000 * self.cpu / self.images,
            "block_images_per_s": [round(x, 2) for x in self.blocks],
        }


@torch.no_grad()
def serve_yardstick(model: str, tensor: str, keep_heap: bool) -> None:
    """The yardstick's process: 3 warm-up batches, then for each number read from stdin, that many batches,
    answered with their images, seconds, minor page faults and CPU seconds as one JSON line."""
    if keep_heap:
        keep_freed_memory()
    base, pixel_values = load_vision_model(model), torch.load(tensor)
    for _ in range(3):
        base(pixel_values=pixel_values)
    print("ready", flush=True)
    for line in sys.stdin:
        (faults, cpu), started = _usage(), time.perf_counter()
        for _ in range(int(line)):
            base(pixel_values=pixel_values)
        seconds = time.perf_counter() - started
        end_faults, end_cpu = _usage()
        answer = {"images": int(line) * len(pixel_values), "seconds": seconds, "faults": end_faults - faults}
        print(json.dumps({**answer, "cpu": end_cpu - cpu}), flush=True)


class Interleaved:
    """The batches of ``loader``, pausing for a yardstick block after every ``every`` of them. The pauses' time,
    faults and CPU are kept to subtract from the pass, and each stretch of the pass between two pauses is timed, to
    pair with the yardstick block that follows it."""

    def __init__(self, loader: DataLoader, every: int, bare: Yardstick):
        self.loader, self.every, self.bare = loader, every, bare
        self.dataset = loader.dataset  # so that collect_units knows the size, as it does of the CLI's DataLoader
        self.paused_seconds = self.paused_faults = self.paused_cpu = self.pauses = 0
        self.pairs: list[float] = []  # per stretch: the pass's images/s over the next yardstick block's

    def __iter__(self):
        stretch, images = time.perf_counter(), 0
        for step, batch in enumerate(self.loader, 1):
            yield batch
            images += len(batch["label"])
            if step % self.every == 0:
                (faults, cpu), started = _usage(), time.perf_counter()
                rate = images / (started - stretch)
                time.sleep(0.1)  # a worker finishes its prefetch now, not in the yardstick's time
                self.bare.block()
                self.pairs.append(rate / self.bare.blocks[-1])
                after_faults, after_cpu = _usage()
                self.paused_seconds += time.perf_counter() - started
                self.paused_faults += after_faults - faults
                self.paused_cpu += after_cpu - cpu
                self.pauses += 1
                stretch, images = time.perf_counter(), 0


class _Probe(torch.utils.data.Dataset):
    """Where a loader's items are made: the process and its torch threads."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        return {"pid": os.getpid(), "threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="user-path-"))
    cli_args = cli.build_parser().parse_args(
        ["train", "--quiet", "--model", args.model, "--dataset", args.dataset, "--samples", str(args.images),
         "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--output", str(scratch)]
    )  # fmt: skip
    if args.path == "before":
        loader = lambda _, dataset: DataLoader(dataset, batch_size=cli_args.batch_size)  # noqa: E731
        heap_kept = False
    else:
        loader, heap_kept = cli._loader, keep_freed_memory()  # as cli.main sets up its process
    if args.workers is not None:  # a variant of the CLI's loader: the same but for the number of workers
        loader = lambda _, dataset: image_loader(dataset, cli_args.batch_size, num_workers=args.workers)  # noqa: E731
    probe = [(int(b["pid"][0]), int(b["threads"][0])) for b in loader(cli_args, _Probe())]
    workers = {threads for pid, threads in probe if pid != os.getpid()}
    base = cli._model(cli_args)
    pool = cli._split(cli_args, cli_args.split, cli_args.samples)
    train, val = holdout(cli._prepared(cli_args, pool), cli_args.val_fraction)
    ready = next(iter(DataLoader(train, batch_size=cli_args.batch_size)))["pixel_values"].contiguous()
    torch.save(ready, scratch / "ready.pt")
    del ready
    fresh = Yardstick(args.model, scratch / "ready.pt", args.alone_batches, keep_heap=False)
    fresh.block()  # a user's own loop, glibc's defaults: the yardstick of page faults
    fresh = fresh.close()
    bare = Yardstick(args.model, scratch / "ready.pt", args.bare_batches, keep_heap=not args.yardstick_default_heap)
    load = [os.getloadavg()]
    tally = dict.fromkeys(("seconds", "faults", "cpu", "child_faults", "child_cpu", "images", "pauses"), 0)
    tally.update(paused_seconds=0, paused_faults=0, paused_cpu=0)
    pairs = []
    for split in (train, val):
        batches = Interleaved(loader(cli_args, split), args.every, bare)
        (faults, cpu), (child_faults, child_cpu) = _usage(), _usage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        units = collect_units(base, batches, progress=False)
        tally["seconds"] += time.perf_counter() - started
        (end_faults, end_cpu), (child_end_faults, child_end_cpu) = _usage(), _usage(resource.RUSAGE_CHILDREN)
        tally["faults"] += end_faults - faults
        tally["cpu"] += end_cpu - cpu
        tally["child_faults"] += child_end_faults - child_faults
        tally["child_cpu"] += child_end_cpu - child_cpu
        for name in ("paused_seconds", "paused_faults", "paused_cpu", "pauses"):
            tally[name] += getattr(batches, name)
        tally["images"] += len(units)
        pairs += batches.pairs
        del units
    load.append(os.getloadavg())
    bare.block()  # the yardstick gets a block after the pass too
    bare = bare.close()
    images, child_faults, child_cpu = tally["images"], tally["child_faults"], tally["child_cpu"]
    pass_seconds = tally["seconds"] - tally["paused_seconds"]
    main_faults, main_cpu = tally["faults"] - tally["paused_faults"], tally["cpu"] - tally["paused_cpu"]
    batches_run = -(-len(train) // cli_args.batch_size) + -(-len(val) // cli_args.batch_size)
    low, median, high = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (pairs or [float("nan")]) * 3
    passed = {
        "images_per_s": images / pass_seconds,
        "seconds": pass_seconds,
        "minor_faults_per_image": (main_faults + child_faults) / images,
        "minor_faults_per_image_main": main_faults / images,
        "minor_faults_per_image_workers": child_faults / images,
        "cpu_ms_per_image": 1000 * (main_cpu + child_cpu) / images,
        "cpu_ms_per_image_main": 1000 * main_cpu / images,
        "cpu_ms_per_image_workers": 1000 * child_cpu / images,
        "num_workers": len({pid for pid, _ in probe if pid != os.getpid()}),
        "worker_torch_threads": sorted(workers) or None,
        "heap_kept": heap_kept,
        # at most two prefetched batches per pause decoded off the clock, at the worker's CPU cost per batch
        "prefetch_bound": 2 * tally["pauses"] * child_cpu / batches_run / pass_seconds,
    }
    record = {
        "path": args.path,
        "images": images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "pass": passed,
        "bare": {**bare, "heap_kept": not args.yardstick_default_heap},
        "bare_alone_glibc_defaults": fresh,
        "main_torch_threads": torch.get_num_threads(),
        "loadavg_before_after": [list(x) for x in load],
        "speed_ratio": passed["images_per_s"] / bare["images_per_s"],
        "speed_ratio_paired": {"median": median, "quartiles": [low, high], "pairs": len(pairs)},
        "fault_ratio": passed["minor_faults_per_image"] / fresh["minor_faults_per_image"],
    }
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local directory or Hub id of the model")
    parser.add_argument("--dataset", required=True, help="local save_to_disk directory or Hub id (split: train)")
    parser.add_argument("--images", type=int, default=3000, help="images drawn for the pass (train + validation)")
    parser.add_argument("--image-size", type=int, default=98)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every", type=int, default=8, help="pass batches between two yardstick blocks")
    parser.add_argument("--bare-batches", type=int, default=3, help="yardstick batches per block in the pass")
    parser.add_argument("--alone-batches", type=int, default=20, help="batches of the glibc-defaults loop")
    parser.add_argument(
        "--path", choices=["cli", "before"], default="cli", help="cli: the CLI's process and loader; before: issue 30's"
    )
    parser.add_argument("--workers", type=int, help="decoding worker processes (default: as the CLI's loader)")
    parser.add_argument(
        "--yardstick-default-heap", action="store_true", help="time the bare forward with glibc's defaults"
    )
    parser.add_argument("--output", type=Path, help="JSON record (default: benchmarks/results/user_path_*.json)")
    parser.add_argument("--serve-yardstick", help=argparse.SUPPRESS)  # internal: the yardstick's own process
    parser.add_argument("--keep-heap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_yardstick:
        serve_yardstick(args.model, args.serve_yardstick, args.keep_heap)
        return
    record = run(args)
    passed, bare, fresh = record["pass"], record["bare"], record["bare_alone_glibc_defaults"]
    paired = record["speed_ratio_paired"]
    print(f"load average before / after the pass: {record['loadavg_before_after']}")
    print(f"torch threads: main {record['main_torch_threads']}, worker {passed['worker_torch_threads']} "
          f"({passed['num_workers']} worker(s)); glibc heap kept: {passed['heap_kept']}")  # fmt: skip
    print(f"CLI pass ({args.path}): {record['images']} images, {passed['images_per_s']:.1f} images/s, "
          f"{passed['minor_faults_per_image']:.0f} minor faults/image (main {passed['minor_faults_per_image_main']:.0f}"
          f", workers {passed['minor_faults_per_image_workers']:.0f}), CPU {passed['cpu_ms_per_image']:.1f} ms/image "
          f"(main {passed['cpu_ms_per_image_main']:.1f}, "
          f"workers {passed['cpu_ms_per_image_workers']:.1f})")  # fmt: skip
    for name, yardstick in (("interleaved, heap kept" if bare["heap_kept"] else "interleaved", bare),
                            ("a loop before the pass, glibc's defaults", fresh)):  # fmt: skip
        print(f"bare forward ({name}): {yardstick['images']} images, {yardstick['images_per_s']:.1f} images/s, "
              f"{yardstick['minor_faults_per_image']:.0f} minor faults/image, "
              f"CPU {yardstick['cpu_ms_per_image']:.1f} ms/image")  # fmt: skip
    print(f"speed: {record['speed_ratio']:.3f} overall, {paired['median']:.3f} median of {paired['pairs']} adjacent "
          f"pairs (quartiles {paired['quartiles'][0]:.3f}-{paired['quartiles'][1]:.3f}), prefetch edge at most "
          f"{passed['prefetch_bound']:.3f} (goal >= 0.95)")  # fmt: skip
    print(f"faults: {record['fault_ratio']:.2f}x the glibc-defaults loop's (goal <= 1.2)")
    argv = sys.argv[1:] if argv is None else argv
    record["command"] = recorded_command("benchmarks.user_path", argv)
    record["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__}
    output = args.output or Path(f"benchmarks/results/user_path_{args.path}_{record['images']}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {output}")


if __name__ == "__main__":
    main()
