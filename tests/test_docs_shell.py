"""Every shell line in README.md and docs/*.md runs, offline, on tiny local models and data (the Python blocks run in
test_docs.py).

Conventions:

- Every fenced block names its language, so that no shell line hides in a bare fence; shell lines are in ```bash
  blocks. A line ending in ``\\`` continues on the next; ``#`` starts a comment.
- Granularity is the block. A ```bash block runs line by line, in order, in one fresh working directory, so a line
  may use what an earlier one wrote (``eval --adapter cifar10-residual`` after ``train --output cifar10-residual``),
  as a reader typing them would. A block that cannot run is preceded by ``<!-- not run: reason -->``, as Python
  blocks are; a block mixing runnable and unrunnable lines is split in two. A reason that names a test
  (``tests/FILE.py::NAME``, where the line runs in another form) must name one that exists.
- Hub ids and placeholders map to tiny fixtures through :data:`HUB`, the one table. The fixtures are laid out under
  those very names in the working directory (``openai/clip-vit-base-patch32/`` is a ``save_pretrained`` directory
  there), and models and data sets are read from a local directory of that name before the Hub, so every line runs
  as written: only :data:`SHRINK`'s options are appended (argparse keeps the last), to keep it short.
- ``peft-residual ...`` runs in this process through ``peft_residual.cli.main``, ``python SCRIPT.py ...`` through
  ``runpy`` (the script's path read from the repository root). A ``push`` goes to the tests' local Hub server. Any
  other program fails the test: a new kind of line needs a runner here, or a ``not run`` reason in the markdown.
- Before a line runs, each model, data set or adapter it names must be in :data:`HUB` or written by an earlier line of
  its block, so no line reaches for the network.
"""

from __future__ import annotations

import itertools
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from peft_residual.cli import main

from .conftest import make_model, save_image_dataset

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Every Hub id and placeholder the docs' shell lines name -> the tiny stand-in built by fixtures().
HUB = {
    "openai/clip-vit-base-patch32": "clip",
    "facebook/dinov2-small": "dinov2",
    "DIR/models/dinov2-small-imgfocus": "dinov2",
    "uoft-cs/cifar10": "images with an img column",
    "ylecun/mnist": "images",
    "ILSVRC/imagenet-1k": "images",
    "DIR/datasets/fashion-mnist": "other images",
    "zalando-datasets/fashion_mnist": "other images",
    "me/cifar10-residual": "a repo on the local Hub server",
}
# Options appended to a program's lines (a peft-residual command, or a script), for run time only.
SHRINK = {"train": ["--epochs", "2"], "examples/quickstart.py": ["--epochs", "2"]}
SOURCES = ("--model", "--dataset", "--compare-dataset", "--adapter", "--bases", "--classifier")


def fixtures(root: Path) -> dict[str, Path]:
    """The stand-ins of :data:`HUB`, built once: a tiny CLIP with its tokenizer, a tiny DINOv2 with 14-pixel patches
    like the real one (so ``--image-size 98`` runs as written), and small image data sets."""
    from transformers import BitImageProcessor, CLIPImageProcessor

    from .conftest import IMAGE_SIZE, word_tokenizer

    built = {name: root / name.replace(" ", "-") for name in set(HUB.values()) - {"a repo on the local Hub server"}}
    size, crop = {"shortest_edge": IMAGE_SIZE}, {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    make_model("clip").save_pretrained(built["clip"])
    CLIPImageProcessor(size=size, crop_size=crop).save_pretrained(built["clip"])
    word_tokenizer().save_pretrained(built["clip"])
    make_model("dinov2", patch_size=14, image_size=56).save_pretrained(built["dinov2"])
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(
        built["dinov2"]
    )
    save_image_dataset(built["images"], n_train=48, n_test=24)
    save_image_dataset(built["other images"], n_train=48, n_test=24, seed=1)
    save_image_dataset(built["images with an img column"], n_train=48, n_test=24, image_column="img")
    return built


def fences(path: Path) -> list[tuple[int, str, str, str]]:
    """``(line number, language, the line before the fence, body)`` of every fenced block of a page."""
    found, lines, number = [], path.read_text().splitlines(), 0
    while number < len(lines):
        if lines[number].startswith("```"):
            end = next(i for i in range(number + 1, len(lines)) if lines[i].startswith("```"))
            before = lines[number - 1] if number else ""
            found.append((number + 1, lines[number][3:].strip(), before, "\n".join(lines[number + 1 : end])))
            number = end
        number += 1
    return found


def shell_lines(body: str) -> list[list[str]]:
    """The commands of a bash block: continuations joined, comments and blank lines dropped."""
    return [words for line in body.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


def blocks() -> list[tuple[str, str, str]]:
    """``(name, the line before, body)`` of every bash block."""
    return [
        (f"{page.relative_to(ROOT)}:{line}", before, body)
        for page in PAGES
        for line, language, before, body in fences(page)
        if language == "bash"
    ]


RUNNABLE = [(name, body) for name, before, body in blocks() if not before.startswith("<!-- not run")]


def test_every_fence_names_its_language_and_shell_is_bash():
    for page in PAGES:
        for line, language, _, _ in fences(page):
            assert language in ("python", "bash", "text"), f"{page.name}:{line}: ```{language}"


def test_a_block_not_run_says_why_and_a_test_it_names_exists():
    marked = [(name, before) for name, before, _ in blocks() if before.startswith("<!-- not run")]
    assert marked and RUNNABLE
    for name, before in marked:
        reason = re.fullmatch(r"<!-- not run: (.+) -->", before)
        assert reason and len(reason[1]) > 10, f"{name}: {before}"
        for file, test in re.findall(r"(tests/\w+\.py)(?:::(\w+))?", reason[1]):
            assert (ROOT / file).exists(), f"{name} names {file}"
            assert not test or f"def {test}(" in (ROOT / file).read_text(), f"{name} names {file}::{test}"


def test_every_name_in_the_table_is_used_by_a_shell_line():
    text = "\n".join(body for _, _, body in blocks())
    assert [name for name in HUB if name not in text] == []


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    return fixtures(tmp_path_factory.mktemp("stand_ins"))


def lay_out(directory: Path, built: dict[str, Path]) -> None:
    """Each name of :data:`HUB` as a path in ``directory``, linked to its stand-in."""
    for name, fixture in HUB.items():
        if fixture in built:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).symlink_to(built[fixture], target_is_directory=True)


def run_line(words: list[str], directory: Path, capfd) -> tuple[int, str, str]:
    """One shell line in this process: exit status, stdout, stderr."""
    program, args = words[0], words[1:]
    if program == "peft-residual":
        argv = [*args, *SHRINK.get(args[0], [])]

        def run() -> int:
            return main(argv)

    elif program == "python" and args and args[0].endswith(".py"):
        argv = [str(ROOT / args[0]), *args[1:], *SHRINK.get(args[0], [])]

        def run() -> int:
            sys.argv = argv  # restored by the test's monkeypatch
            runpy.run_path(argv[0], run_name="__main__")
            return 0

    else:
        pytest.fail(f"no runner for {shlex.join(words)!r}: add one here, or mark its block <!-- not run: reason -->")
    for option, value in itertools.pairwise(argv):
        if option in SOURCES and value not in HUB and not (directory / value).exists():
            pytest.fail(f"{shlex.join(words)!r} names {value!r}: add it to HUB or write it in an earlier line")
    capfd.readouterr()
    try:
        code = run()
    except SystemExit as stop:
        code = stop.code
    captured = capfd.readouterr()
    return code or 0, captured.out, captured.err


@pytest.mark.parametrize("name,body", RUNNABLE, ids=[name for name, _ in RUNNABLE])
def test_shell_block_runs(name, body, stand_ins, tmp_path, monkeypatch, capfd, local_hub):
    import tempfile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a script's default output directory lands here
    lay_out(tmp_path, stand_ins)
    for words in shell_lines(body):
        code, out, err = run_line(words, tmp_path, capfd)
        assert code == 0, f"{shlex.join(words)}\n{err}"
        assert out.strip(), shlex.join(words)  # every command ends by saying what it did
        if "--output" in words:
            assert any((tmp_path / words[words.index("--output") + 1]).iterdir())
        if words[:2] == ["peft-residual", "push"]:
            repo = local_hub.state.repos[words[words.index("--repo-id") + 1]]
            assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(repo.files)
