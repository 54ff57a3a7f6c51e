"""Issue 27's goal 6: no import circle in the library or the benchmarks, and the library imports none of the scripts
around it. The graph is benchmarks/house.py's (every ``import`` and ``from``, inside functions too)."""

from __future__ import annotations

from benchmarks.house import circles, describe_cycle, import_graph, working_tree

OWNED = ("peft_residual", "benchmarks")


def test_no_import_circle_in_the_library_or_the_benchmarks():
    edges = import_graph(working_tree())
    found = [c for c in circles(edges) if any(m.split(".")[0] in OWNED for m in c.members)]
    shown = [f"{' ↔ '.join(c.members)}: {describe_cycle(c.cycles[0], c)}" for c in found]
    assert not found, "import circles (move what both sides need into a module that imports neither):\n" + "\n".join(
        shown
    )


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
