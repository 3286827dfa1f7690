"""The import graph inside ``ops/`` has no cycle, and :mod:`ops.validation` is a leaf of it.

Every module of ops/ is parsed with ast and each import of another ops module is an edge. Imports
inside functions count (an import moved into a function to dodge a cycle is still a dependency; it only
runs later). Imports under ``if TYPE_CHECKING:`` do not: they never run, they only name types for
annotations. A package's ``__init__`` is its own node; importing ``ops.a.b`` is an edge to ``ops.a.b``,
not to the parents that Python initialises on the way (every module would otherwise depend on
``ops/__init__``, which imports them all).
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO_ROOT

OPS = REPO_ROOT / "ops"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def ops_import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the ops modules it imports} for the package ``ops`` under ``root`` (the directory that
    holds ``ops/``)."""
    files = sorted((root / "ops").rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)])
                    origin = f"{base}.{node.module}" if node.module else base
                else:
                    origin = node.module or ""
                # `from pkg import sub` imports the submodule sub when there is one, else a name of pkg
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [m0, m1, ..., m0], or None when it is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_the_packages_modules_and_their_imports():
    graph = ops_import_graph(REPO_ROOT)
    assert {"ops", "ops.backends", "ops.validation", "ops.sifa.kernels", "ops.repflow.kernels"} <= set(graph)
    assert "ops.backends" in graph["ops.sifa.functional"]  # `from ..backends import use_kernels`
    assert "ops.sifa.fast_kernels" in graph["ops.sifa.kernels"]
    assert "ops.kernel_loader" in graph["ops"]  # `from . import kernel_loader`: the submodule


def test_find_cycle_finds_a_cycle_through_a_function_local_import(tmp_path):
    pkg = tmp_path / "ops"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "a.py").write_text("from .b import f\n", encoding="utf-8")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n", encoding="utf-8")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\n", encoding="utf-8"
    )
    graph = ops_import_graph(tmp_path)
    assert graph["ops.c"] == set()  # annotations only
    assert find_cycle(graph) == ["ops.a", "ops.b", "ops.a"]


def test_ops_has_no_import_cycle():
    cycle = find_cycle(ops_import_graph(REPO_ROOT))
    assert cycle is None, "import cycle in ops/: " + " -> ".join(cycle)


def test_validation_and_backends_sit_at_the_bottom():
    graph = ops_import_graph(REPO_ROOT)
    assert graph["ops.validation"] == set(), graph["ops.validation"]
    assert graph["ops.backends"] == {"ops.validation"}, graph["ops.backends"]
