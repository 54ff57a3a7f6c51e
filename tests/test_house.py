"""Issue 27's goal 6: no import circle in the library or the benchmarks, and the library imports none of the scripts
around it. The graph is benchmarks/house.py's (every ``import`` and ``from``, inside functions too)."""

from __future__ import annotations

from benchmarks.house import LIBRARY, circles, describe_cycle, folders, import_graph, working_tree

OWNED = ("peft_residual", "benchmarks")


def test_no_import_circle_in_the_library_or_the_benchmarks():
    edges = import_graph(working_tree())
    found = [c for c in circles(edges) if any(m.split(".")[0] in OWNED for m in c.members)]
    shown = [f"{' ↔ '.join(c.members)}: {describe_cycle(c.cycles[0], c)}" for c in found]
    assert not found, "import circles (move what both sides need into a module that imports neither):\n" + "\n".join(
        shown
    )


def sub_package_circles(files: dict[str, str]):
    """Circles between the library's sub-packages (tuner/, models/, data/, ...), every module replaced by its
    folder; the package's own folder (its ``__init__``, the CLI, the leaves ``errors`` and ``unit_names``) aside."""
    folder_of = folders(files)
    sub_packages = {f for f in folder_of.values() if f.startswith(LIBRARY + "/") and f != LIBRARY + "/"}
    return circles(import_graph(files), nodes=sub_packages, of=folder_of.__getitem__)


def test_no_import_circle_between_the_library_sub_packages():
    """A folder-level circle (models/ importing tuner/'s error while tuner/ imports models/) is no module circle,
    but it ties the folders together all the same."""
    found = sub_package_circles(working_tree())
    shown = [f"{' ↔ '.join(c.members)}: {describe_cycle(c.cycles[0], c)}" for c in found]
    assert not found, (
        "folder import circles (move what both folders need into a leaf module, e.g. peft_residual/errors.py, or "
        "into the folder below):\n" + "\n".join(shown)
    )


def test_a_folder_circle_without_a_module_circle_is_found():
    """The shape the library had: models.spec imports tuner.config, tuner.layer imports models.spec; no module
    imports one that imports it back."""
    files = {
        "peft_residual/__init__.py": "from .tuner import layer\n",
        "peft_residual/errors.py": "",
        "peft_residual/models/__init__.py": "",
        "peft_residual/models/spec.py": "from ..tuner.config import ResiDualInputError\n",
        "peft_residual/tuner/__init__.py": "",
        "peft_residual/tuner/config.py": "from ..errors import ResiDualInputError\n",
        "peft_residual/tuner/layer.py": "from ..models.spec import refusal\nfrom .config import ResiDualInputError\n",
    }
    assert not circles(import_graph(files))
    (circle,) = sub_package_circles(files)
    assert circle.members == ["peft_residual/models/", "peft_residual/tuner/"] and circle.load_time
    files["peft_residual/models/spec.py"] = "from ..errors import ResiDualInputError\n"
    assert not sub_package_circles(files)


def test_the_library_imports_no_benchmark_example_or_test():
    edges = import_graph(working_tree())
    outward = [
        str(e)
        for e in edges
        if e.source.split(".")[0] == "peft_residual" and e.target.split(".")[0] != e.source.split(".")[0]
    ]
    assert not outward, "the library imports scripts around it:\n" + "\n".join(outward)


def test_a_circle_through_an_import_inside_a_function_is_found():
    """The detector itself, on the shape the benchmarks had (report imported paper's table inside a function)."""
    files = {
        "benchmarks/__init__.py": "",
        "benchmarks/report.py": "import json\n\ndef grid():\n    from .paper import table\n",
        "benchmarks/run.py": "from . import report\n",
        "benchmarks/paper.py": "from . import run\nfrom .report import grid\n",
        "peft_residual/__init__.py": "from .tuner import config\n",
        "peft_residual/tuner/__init__.py": "",
        "peft_residual/tuner/config.py": "import peft_residual.tuner\nfrom ..tuner import config\n",
    }
    edges = import_graph(files)
    assert {(e.source, e.target, e.kind, e.scope) for e in edges} == {
        ("benchmarks.report", "benchmarks.paper", "from", "function"),
        ("benchmarks.run", "benchmarks.report", "from", "module"),
        ("benchmarks.paper", "benchmarks.run", "from", "module"),
        ("benchmarks.paper", "benchmarks.report", "from", "module"),
        ("peft_residual", "peft_residual.tuner.config", "from", "module"),
        ("peft_residual.tuner.config", "peft_residual.tuner", "import", "module"),
    }
    (circle,) = circles(edges)
    assert circle.members == ["benchmarks.paper", "benchmarks.report", "benchmarks.run"] and not circle.load_time
    assert [len(cycle) - 1 for cycle in circle.cycles] == [2, 3]
