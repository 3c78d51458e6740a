"""Imports run one way: ``modeld_zenml`` -> ``deployers`` -> ``daemon``, with no cycle inside ``daemon/``.

The graph is read from the source (``ast``), so the test sees every import, including those inside functions
(lazy ones), but not those under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from daemon.testing import REPO

PACKAGES = ("daemon", "deployers", "modeld_zenml")
# Lower layers never import higher ones.
LAYER = {"daemon": 0, "deployers": 1, "modeld_zenml": 2}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(eager, lazy): module -> the project modules it imports at import time, and inside functions."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    eager: dict[str, set[str]] = defaultdict(set)
    lazy: dict[str, set[str]] = defaultdict(set)
    for module, (path, is_package) in modules.items():
        package = module.split(".") if is_package else module.split(".")[:-1]

        def visit(node: ast.AST, in_function: bool, module: str = module, package: list[str] = package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [alias.name for alias in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parent = package[: len(package) - (child.level - 1)]
                        base = ".".join(parent + ([base] if base else []))
                    # ``from package import module`` depends on that module, not on what the package's
                    # __init__ imports (Python runs the parent first anyway, whatever the import).
                    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
                for name in names:
                    target = known(name)
                    if target and target != module:
                        (lazy if inside else eager)[module].add(target)
                visit(child, inside)

        visit(ast.parse(path.read_text()), False)
    return eager, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_is_read() -> None:
    """A guard for the test itself: known edges are seen, eager and lazy."""
    eager, lazy = import_graph()
    assert "daemon.models" in eager["daemon.store"]
    assert "daemon.models" in eager["deployers.base"]
    assert "deployers.local.deployer" in lazy["deployers.local.flavor"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_run_one_way() -> None:
    eager, lazy = import_graph()
    wrong = []
    for module in set(eager) | set(lazy):
        for target in eager[module] | lazy[module]:
            if LAYER[target.split(".")[0]] > LAYER[module.split(".")[0]]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_cycle_inside_daemon() -> None:
    """Not even through an import inside a function: the daemon's modules form a tree of layers."""
    eager, lazy = import_graph()
    both = {m: {t for t in eager[m] | lazy[m] if t.startswith("daemon")} for m in set(eager) | set(lazy)
            if m.startswith("daemon")}
    assert cycles(both) == []


def test_no_import_time_cycle_anywhere() -> None:
    """A flavor names its implementation lazily (ZenML's design), the only way back up a package is inside a function."""
    eager, _ = import_graph()
    assert cycles(eager) == []


def test_the_readme_architecture_names_every_module() -> None:
    """The README's map of the folders stays true: each module of daemon/ (and each subpackage) is named there."""
    readme = (REPO / "README.md").read_text()
    architecture = readme[readme.index("## Architecture") :]
    architecture = architecture.split("\n## ")[0]  # to the next part, if any
    missing = [
        path.name
        for path in sorted((REPO / "daemon").iterdir())
        if (path.suffix == ".py" and not path.name.startswith("_") and path.name not in architecture)
        or (path.is_dir() and (path / "__init__.py").exists() and f"{path.name}/" not in architecture)
    ]
    assert missing == []
