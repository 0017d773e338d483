"""The package's import structure: no import cycle, and no module importing one above it.

Every ``import`` in ``gonogo/`` counts, also those inside functions and under ``TYPE_CHECKING``
(a late import hides a dependency from the reader, not from the design). ``LAYERS`` is the
order of the package, bottom first: a module may import its own layer or one below it. A module
belongs to the layer of its longest matching prefix.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gonogo"

# bottom first; a prefix names a module or a package (and everything under it), "=name" that
# module only
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["=gonogo", "gonogo.errors", "gonogo.names", "gonogo.files", "gonogo.typed_config",
                    "gonogo.procs"]),
    ("run records", ["gonogo.events", "gonogo.rundir", "gonogo.budget", "gonogo.gates", "gonogo.plots",
                     "gonogo.stages.base"]),
    ("model and data", ["gonogo.model", "gonogo.data"]),
    ("checkpoints and parallelism", ["gonogo.checkpoints", "gonogo.parallel"]),
    ("export", ["gonogo.export"]),
    ("cluster", ["gonogo.cluster"]),
    ("training", ["gonogo.train"]),
    ("inference", ["gonogo.infer"]),
    ("evaluation", ["gonogo.eval"]),
    ("rollout", ["gonogo.rollout"]),
    ("capacity", ["gonogo.capacity"]),
    ("plans", ["gonogo.plan", "=gonogo.stages"]),  # gonogo.stages: the registry, which names kinds by module
    ("report", ["gonogo.report"]),
    ("runner", ["gonogo.runner"]),
    ("command helpers", ["gonogo.plan_cli", "gonogo.stage_cli"]),
    # each kind is a folder gonogo/stages/<kind>/ (stage.py); the runner finds them through the
    # registry, and they may use everything below (the drills compose the train and canary kinds)
    ("stage kinds", ["gonogo.stages", "gonogo.drills"]),
    ("command line", ["gonogo.cli", "gonogo.__main__"]),
]


def modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """module -> {imported gonogo module: line of the first such import}."""
    known = modules(package)

    def owner(name: str) -> str | None:  # the module a dotted name is, or lives in
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for module, path in known.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                # `from a import b` depends on the module a.b when there is one, else on a
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in node.names]
            for target in targets:
                if target.split(".")[0] != PACKAGE.name:
                    continue
                imported = owner(target)
                if imported is not None and imported != module:
                    graph[module].setdefault(imported, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
    return found


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for number, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.startswith("="):  # this module only: it wins over any prefix
                matches, length = module == prefix[1:], len(prefix)
            else:
                matches, length = module == prefix or module.startswith(prefix + "."), len(prefix)
            if matches and length > best_length:
                best, best_length = number, length
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best


def upward_imports(graph: dict[str, dict[str, int]], package: Path) -> list[str]:
    known = modules(package)
    found = []
    for module in sorted(graph):
        for imported, line in sorted(graph[module].items()):
            if layer_of(imported) > layer_of(module):
                found.append(f"{known[module].relative_to(package.parent)}:{line}: {module} "
                             f"({LAYERS[layer_of(module)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})")
    return found


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_module_imports_one_above_it():
    assert upward_imports(import_graph(PACKAGE), PACKAGE) == []


def test_every_module_has_a_layer():
    for module in modules(PACKAGE):
        layer_of(module)


# file names every package may repeat: a package's __init__ and each stage kind's entry point
CONVENTIONAL_NAMES = {"__init__.py", "stage.py"}


def repeated_file_names(package: Path) -> dict[str, list[str]]:
    """File name -> the modules that share it, outside the conventional names."""
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in sorted(package.rglob("*.py")):
        if path.name not in CONVENTIONAL_NAMES:
            by_name[path.name].append(path.relative_to(package.parent).as_posix())
    return {name: paths for name, paths in by_name.items() if len(paths) > 1}


def test_no_two_modules_share_a_file_name():
    """A name says one job: two ``config.py`` (or ``runner.py``) in different packages read as one."""
    assert repeated_file_names(PACKAGE) == {}


def test_the_name_check_sees_a_repeated_name(toy_package: Path):
    (toy_package / "config.py").write_text("")
    (toy_package / "model" / "config.py").write_text("")
    assert repeated_file_names(toy_package) == {"config.py": ["gonogo/config.py", "gonogo/model/config.py"]}


@pytest.fixture()
def toy_package(tmp_path: Path) -> Path:
    package = tmp_path / "gonogo"
    (package / "model").mkdir(parents=True)
    for name in ("__init__.py", "errors.py", "model/__init__.py"):
        (package / name).write_text("")
    return package


def test_the_check_sees_a_cycle_through_a_late_import(toy_package: Path):
    (toy_package / "model" / "a.py").write_text("from gonogo.model import b\n")
    (toy_package / "model" / "b.py").write_text("def f():\n    from gonogo.model.a import x\n")
    assert cycles(import_graph(toy_package)) == [["gonogo.model.a", "gonogo.model.b"]]


def test_the_check_sees_an_upward_import(toy_package: Path):
    (toy_package / "errors.py").write_text("def f():\n    from gonogo.model import thing\n")
    problems = upward_imports(import_graph(toy_package), toy_package)
    assert len(problems) == 1 and problems[0].startswith("gonogo/errors.py:2: gonogo.errors (foundation)")
