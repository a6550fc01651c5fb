"""Imports run one way in every package: no module imports, even only for type checking, a
module that imports it back (directly or around a circle)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def local_imports(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` and the modules of the same package it imports."""
    graph = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module or "")
                found |= {module} | {f"{module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m.startswith(package + ".") or m == package}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path, node, dep]
            if dep not in state and (found := visit(dep, [*path, node])):
                return found
        state[node] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, []))), None)


@pytest.mark.parametrize("package", ["fusion", "studio"])
def test_no_import_cycles(package):
    graph = {m: deps - {package} for m, deps in local_imports(package).items() if m != package}
    assert a_cycle(graph) is None, " -> ".join(a_cycle(graph))
