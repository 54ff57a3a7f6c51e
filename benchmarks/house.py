"""The house in numbers (issue 27): sizes per folder, import circles, longest functions, owners per concept.

    python -m benchmarks.house                      # the working tree
    python -m benchmarks.house --rev fe88c51        # a git revision, read with git ls-tree / git cat-file
    python -m benchmarks.house --compare fe88c51    # before (that revision) / after (the working tree), one table

Counts the Python files under ``peft_residual/`` (each subfolder apart), ``tests/``, ``benchmarks/`` and
``examples/``. The import graph is parsed with :mod:`ast`: every ``import`` and ``from`` statement, at module level
and inside functions, relative imports resolved, kept where it names one of those modules. ``from X import Y`` points
at ``X.Y`` when that is a module, else at ``X``; importing ``a.b`` is not counted as importing ``a`` (so a package's
``__init__`` re-exporting its submodules is no circle by itself). An import's scope is ``module`` (runs when the
module loads), ``function`` (runs when the function is called) or ``type-checking`` (under ``if TYPE_CHECKING``).
A circle is a strongly connected component of that graph; the folder graph is the same with every module replaced by
its folder. Owners per concept are fixed patterns (:data:`CONCEPTS`) matched line by line. Only the standard library
is used, so the tests can import it (tests/test_house.py).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("peft_residual", "tests", "benchmarks", "examples")
LIBRARY = "peft_residual"
TUNER = "peft_residual/tuner/"
SKIPPED_DIRS = {"__pycache__", "results"}
SELF = "benchmarks/house.py"  # its patterns are no sites


# --- reading a tree: the working tree from disk, a revision from git --------------------------------------------


def working_tree(root: Path = ROOT) -> dict[str, str]:
    """Every ``.py`` file under :data:`FOLDERS` on disk, ``{posix path: text}``."""
    files = {}
    for folder in FOLDERS:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = Path(dirpath, name)
                    files[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
    return files


def revision_tree(rev: str, root: Path = ROOT) -> dict[str, str]:
    """The same files at git revision ``rev``, read from the object store (no checkout)."""
    listing = subprocess.run(
        ["git", "ls-tree", "-r", rev, "--", *FOLDERS], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    blobs = {}
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        _, kind, sha = meta.split()
        parts = PurePosixPath(path).parts
        if kind == "blob" and path.endswith(".py") and not SKIPPED_DIRS.intersection(parts[:-1]):
            blobs[path] = sha
    shas = list(dict.fromkeys(blobs.values()))
    out = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=root,
        input="\n".join(shas).encode() + b"\n",
        capture_output=True,
        check=True,
    ).stdout
    texts, at = {}, 0
    for sha in shas:  # each answer: "<sha> blob <size>\n<content>\n"
        header_end = out.index(b"\n", at)
        size = int(out[at:header_end].split()[2])
        texts[sha] = out[header_end + 1 : header_end + 1 + size].decode("utf-8")
        at = header_end + 1 + size + 1
    return {path: texts[sha] for path, sha in sorted(blobs.items())}


def read_tree(rev: str | None) -> dict[str, str]:
    return working_tree() if rev is None else revision_tree(rev)


# --- sizes ----------------------------------------------------------------------------------------------------


def folder_of(path: str) -> str:
    """The folder a file is counted under: ``peft_residual``'s own subfolders apart, the others whole."""
    parts = PurePosixPath(path).parts
    if parts[0] == LIBRARY:
        return "/".join(parts[:-1]) + "/"
    return parts[0] + "/"


def sizes(files: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``{folder: (files, lines)}``, with ``peft_residual/ (all)`` the library's total."""
    counted: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, text in files.items():
        lines = len(text.splitlines())
        for key in {folder_of(path), *([f"{LIBRARY}/ (all)"] if path.startswith(LIBRARY + "/") else [])}:
            counted[key][0] += 1
            counted[key][1] += lines
    return {key: (n, lines) for key, (n, lines) in counted.items()}


# --- the import graph -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    kind: str  # "import" or "from"
    scope: str  # "module", "function" or "type-checking"

    def __str__(self) -> str:
        return f"{self.source} → {self.target} (`{self.kind}`, {self.scope}, line {self.line})"


def module_name(path: str) -> str:
    parts = list(PurePosixPath(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, scope: str = "module"):
    """``(node, scope)`` for every import statement, with the scope it runs in."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, scope
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _imports(node, "function" if scope == "module" else scope)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), "type-checking")
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), scope)
        else:
            yield from _imports(node, scope)


def import_graph(files: dict[str, str]) -> list[Edge]:
    """Every import from one of ``files``' modules to another (self-imports left out)."""
    modules = {module_name(path): path for path in files}
    edges = []
    for path, text in files.items():
        source = module_name(path)
        package = source if path.endswith("__init__.py") else source.rpartition(".")[0]
        for node, scope in _imports(ast.parse(text, filename=path)):
            targets: list[tuple[str, str]] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    found = next(
                        (".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None
                    )
                    targets.append(("import", found) if found else ("import", ""))
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                    stem = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    stem = node.module or ""
                for alias in node.names:
                    child = f"{stem}.{alias.name}" if stem else alias.name
                    targets.append(("from", child if child in modules else stem if stem in modules else ""))
            for kind, target in targets:
                if target and target != source:
                    edges.append(Edge(source, target, node.lineno, kind, scope))
    return sorted(set(edges), key=lambda e: (e.source, e.target, e.line))


def strongly_connected(nodes: set[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """The components with more than one node (Tarjan, iterative), each sorted, largest first."""
    successors = defaultdict(set)
    for a, b in edges:
        if a != b:
            successors[a].add(b)
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(successors[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors_left = work[-1]
            advanced = False
            for nxt in successors_left:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(successors[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found, key=lambda c: (-len(c), c))


def elementary_cycles(component: list[str], edges: list[tuple[str, str]], limit: int = 12) -> list[list[str]]:
    """Up to ``limit`` simple cycles inside one component, each starting at its smallest node."""
    inside = set(component)
    successors = defaultdict(set)
    for a, b in edges:
        if a in inside and b in inside and a != b:
            successors[a].add(b)
    cycles: list[list[str]] = []
    for start in sorted(inside):
        path, stack = [start], [iter(sorted(n for n in successors[start] if n >= start))]
        while stack and len(cycles) < limit:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                path.pop()
            elif nxt == start:
                cycles.append([*path, start])
            elif nxt not in path:
                path.append(nxt)
                stack.append(iter(sorted(n for n in successors[nxt] if n >= start)))
    return sorted(cycles, key=lambda c: (len(c), c))


def folders(files: dict[str, str]) -> dict[str, str]:
    """``{module: its folder}``, e.g. ``peft_residual.tuner.model: peft_residual/tuner/``."""
    return {module_name(path): PurePosixPath(path).parent.as_posix() + "/" for path in files}


@dataclass
class Circle:
    members: list[str]
    edges: list[Edge]  # the imports between members
    steps: dict[tuple[str, str], list[Edge]]  # the same, by (member, member)
    cycles: list[list[str]]
    load_time: bool  # still a circle counting only imports that run when a module loads

    def kinds(self) -> str:
        return ", ".join(
            f"{n} `{kind}` at {scope} scope"
            for (kind, scope), n in sorted(_count((e.kind, e.scope) for e in self.edges).items())
        )


def _count(items) -> dict:
    counted = defaultdict(int)
    for item in items:
        counted[item] += 1
    return counted


def circles(edges: list[Edge], nodes: set[str] | None = None, of=lambda module: module) -> list[Circle]:
    """Import circles among ``nodes`` (default: every module with an import), modules mapped through ``of``
    (e.g. to their folder)."""
    mapped = [(of(e.source), of(e.target), e) for e in edges]
    mapped = [(a, b, e) for a, b, e in mapped if a != b and (nodes is None or (a in nodes and b in nodes))]
    everything = {a for a, _, _ in mapped} | {b for _, b, _ in mapped}
    pairs = [(a, b) for a, b, _ in mapped]
    load_pairs = [(a, b) for a, b, e in mapped if e.scope == "module"]
    load_components = [set(c) for c in strongly_connected(everything, load_pairs)]
    found = []
    for component in strongly_connected(everything, pairs):
        inside = set(component)
        found.append(
            Circle(
                members=component,
                edges=[e for a, b, e in mapped if a in inside and b in inside],
                steps={
                    (a, b): [e for x, y, e in mapped if (x, y) == (a, b)]
                    for a, b in dict.fromkeys((a, b) for a, b in pairs if a in inside and b in inside)
                },
                cycles=elementary_cycles(component, pairs),
                load_time=any(c <= inside for c in load_components),
            )
        )
    return found


def at_load(cycle: list[str], circle: Circle) -> bool:
    """Whether every step of ``cycle`` has an import that runs when its module loads."""
    return all(any(e.scope == "module" for e in circle.steps[step]) for step in pairwise(cycle))


def describe_cycle(cycle: list[str], circle: Circle) -> str:
    """``a → b [the imports that make that step], b → c [...]``, load-time imports first."""
    steps = []
    for a, b in pairwise(cycle):
        imports = sorted(circle.steps[a, b], key=lambda e: (e.scope != "module", e.source, e.line))
        shown = "; ".join(
            (f"{short(e.source)} → {short(e.target)} " if (e.source, e.target) != (a, b) else "")
            + f"`{e.kind}` l.{e.line} {e.scope}"
            for e in imports[:2]
        )
        more = f"; {len(imports) - 2} more" if len(imports) > 2 else ""
        steps.append(f"{short(a)} → {short(b)} [{shown}{more}]")
    load = "at load" if at_load(cycle, circle) else "through an import inside a function"
    return f"({load}) " + ", ".join(steps)


# --- functions and concepts -----------------------------------------------------------------------------------


def longest_functions(files: dict[str, str], prefix: str = LIBRARY + "/", top: int = 10) -> list[tuple[int, str, str]]:
    """``(lines, qualified name, file)`` of the longest functions and methods (``def`` line to last line; functions
    nested in functions are counted with their parent), longest first."""
    found = []
    for path, text in files.items():
        if not path.startswith(prefix):
            continue

        def visit(body: list[ast.stmt], owner: str, path: str = path) -> None:
            for node in body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.append((node.end_lineno - node.lineno + 1, owner + node.name, path))
                elif isinstance(node, ast.ClassDef):
                    visit(node.body, f"{owner}{node.name}.")

        visit(ast.parse(text, filename=path).body, "")
    return sorted(found, key=lambda f: (-f[0], f[2], f[1]))[:top]


@dataclass(frozen=True)
class Concept:
    label: str
    pattern: str
    where: str  # "library", "library outside tuner/", "outside tuner/" (library, benchmarks, examples)
    unit: str = "sites"  # or "files"
    issue: str = ""  # what the issue counted
    owner: str = ""  # the module that owns the concept: its own sites are not counted

    def matches(self, path: str) -> bool:
        if path == self.owner:
            return False
        if self.where == "library":
            return path.startswith(LIBRARY + "/")
        if self.where == "library outside tuner/":
            return path.startswith(LIBRARY + "/") and not path.startswith(TUNER)
        return not path.startswith(TUNER) and not path.startswith("tests/")


CONCEPTS = (
    Concept("`active_adapters[0]`", r"active_adapters\[0\]", "library", issue="7 sites"),
    Concept("active-adapter helpers (`def active_adapter`)", r"^\s*def active_adapter\b", "library"),
    Concept("`.validate()` calls", r"\.validate\(\)", "library", issue="4 places"),
    Concept(
        "`fit_residual_bases` definitions",
        r"^\s*(?:def fit_residual_bases\b|fit_residual_bases\s*=)",
        "library",
        "sites",
        "2",
    ),
    Concept(
        "scales → components mappings (`def lambdas`, `def component_lambdas`)",
        r"^\s*def (?:component_)?lambdas\b",
        "library",
        issue="3",
    ),
    Concept(
        "files naming `residual_lambda` / `residual_mean` / `residual_basis`",
        r"\bresidual_(?:lambda|mean|basis)\b",
        "outside tuner/",
        "files",
        "training/scales.py",
    ),
    Concept(
        "`UnitRecord(` constructions",
        r"(?<!class )\bUnitRecord\(",
        "outside tuner/",
        issue="inference.py",
        owner="peft_residual/records.py",
    ),
    Concept('claims of "the readout formula"', r"(?i)readout formula", "library", issue="layer.py and plan.py"),
    Concept("pointers to `tuner.layer.readout`", r"tuner\.layer\.readout\b", "library", issue="training/scales.py"),
    Concept("`readout_bypassed` sites", r"\breadout_bypassed\b", "library"),
    Concept("`ROLES =` definitions", r"^ROLES\s*=", "library", issue="1, unused"),
)


def concept_sites(files: dict[str, str], concept: Concept) -> list[str]:
    pattern = re.compile(concept.pattern)
    sites = []
    for path, text in files.items():
        if concept.matches(path) and path != SELF:
            sites += [f"{path}:{n}" for n, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    return sites


def concept_count(files: dict[str, str], concept: Concept) -> tuple[int, list[str]]:
    sites = concept_sites(files, concept)
    if concept.unit == "files":
        shown = sorted({site.rpartition(":")[0] for site in sites})
        return len(shown), shown
    return len(sites), sites


def graph_counts(edges: list[Edge]) -> dict[str, list[str]]:
    """Owners read off the import graph."""
    library = LIBRARY + "."

    def is_test_file(module: str) -> bool:
        return module.startswith("tests.test_")

    return {
        "`tuner/config.py`'s imports from the package": sorted(
            {e.target for e in edges if e.source == f"{LIBRARY}.tuner.config" and e.target.startswith(library)}
        ),
        "library imports of benchmarks/ or examples/": [
            str(e)
            for e in edges
            if e.source.startswith(LIBRARY) and e.target.split(".")[0] in {"benchmarks", "examples"}
        ],
        "test files importing other test files": [
            str(e) for e in edges if is_test_file(e.source) and is_test_file(e.target)
        ],
    }


# --- one tree's numbers, and the report -----------------------------------------------------------------------


@dataclass
class Measure:
    label: str
    files: dict[str, str]

    def __post_init__(self) -> None:
        self.sizes = sizes(self.files)
        self.edges = import_graph(self.files)
        self.module_circles = circles(self.edges)
        self.folder_circles = circles(self.edges, of=folders(self.files).__getitem__)
        self.functions = longest_functions(self.files)
        self.concepts = {c.label: concept_count(self.files, c) for c in CONCEPTS}
        self.graph = graph_counts(self.edges)


def _folders(measures: list[Measure]) -> list[str]:
    keys = {key for m in measures for key in m.sizes}
    library = sorted(k for k in keys if k.startswith(LIBRARY + "/") and "(all)" not in k)
    return [f"{LIBRARY}/ (all)", *library, *(f"{f}/" for f in FOLDERS[1:] if f"{f}/" in keys)]


def _circle_summary(found: list[Circle]) -> str:
    if not found:
        return "none"
    return "; ".join(
        f"{' ↔ '.join(short(m) for m in c.members)} ({'at load' if c.load_time else 'in-function only'})" for c in found
    )


def short(name: str) -> str:
    return name.removesuffix("/") if "/" in name else name


def table(measures: list[Measure]) -> list[str]:
    """Markdown: one row per number, one column per tree."""
    lines = ["| | " + " | ".join(m.label for m in measures) + " |", "|---|" + "---|" * len(measures)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(v.replace("|", "\\|") for v in values) + " |")

    for folder in _folders(measures):
        row(
            f"`{folder}` files / lines",
            [f"{m.sizes[folder][0]} / {m.sizes[folder][1]:,}" if folder in m.sizes else "—" for m in measures],
        )
    row("module import circles", [str(len(m.module_circles)) for m in measures])
    row("… of them at load (module-scope imports)", [str(sum(c.load_time for c in m.module_circles)) for m in measures])
    row("module circles", [_circle_summary(m.module_circles) for m in measures])
    row("folder import circles", [str(len(m.folder_circles)) for m in measures])
    row("folder circles", [_circle_summary(m.folder_circles) for m in measures])
    row("longest library function (lines)", [f"{m.functions[0][1]} ({m.functions[0][0]})" for m in measures])
    row("10 longest library functions, lines in all", [str(sum(f[0] for f in m.functions)) for m in measures])
    for concept in CONCEPTS:
        scope = {"library": "library", "library outside tuner/": "library, outside tuner/"}.get(
            concept.where, "outside tuner/, tests aside"
        )
        row(f"{concept.label} ({concept.unit}, {scope})", [str(m.concepts[concept.label][0]) for m in measures])
    for label in measures[0].graph:
        row(label, [str(len(m.graph[label])) for m in measures])
    return lines


def details(measure: Measure) -> list[str]:
    """The evidence behind one column: every circle with its imports, the longest functions, every site."""
    lines = [f"### {measure.label}", ""]
    for title, found in (("Module", measure.module_circles), ("Folder", measure.folder_circles)):
        lines.append(f"{title} import circles: {len(found) or 'none'}")
        for circle in found:
            load = "a circle at load" if circle.load_time else "a circle only through imports inside functions"
            lines.append(f"- {' ↔ '.join(short(m) for m in circle.members)}: {load}; its imports: {circle.kinds()}")
            for cycle in circle.cycles:
                lines.append(f"  - cycle: {describe_cycle(cycle, circle)}")
        lines.append("")
    lines += ["10 longest library functions:", "", "| lines | function | file |", "|---|---|---|"]
    lines += [f"| {n} | `{name}` | {path} |" for n, name, path in measure.functions]
    lines.append("")
    lines.append("Owners per concept (sites):")
    for concept in CONCEPTS:
        count, sites = measure.concepts[concept.label]
        issue = f"; issue 27 counted: {concept.issue}" if concept.issue else ""
        lines.append(f"- {concept.label}: {count}{issue}")
        lines += [f"  - {site}" for site in sites]
    for label, sites in measure.graph.items():
        lines.append(f"- {label}: {len(sites)}")
        lines += [f"  - {site}" for site in sites]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="measure this git revision instead of the working tree")
    parser.add_argument(
        "--compare", metavar="BEFORE", help="a before/after table: BEFORE against --rev (or the working tree)"
    )
    parser.add_argument("--brief", action="store_true", help="the table only, without the sites behind it")
    args = parser.parse_args(argv)
    after = Measure(args.rev or "working tree", read_tree(args.rev))
    measures = [Measure(args.compare, read_tree(args.compare)), after] if args.compare else [after]
    command = "python -m benchmarks.house " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Counted by `{command.strip()}` (Python files under {', '.join(f + '/' for f in FOLDERS)}).\n")
    print("\n".join(table(measures)))
    if not args.brief:
        print()
        for measure in measures:
            print("\n".join(details(measure)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
