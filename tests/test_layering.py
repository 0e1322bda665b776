"""Imports run one way: ops <- layers <- blocks <- models <- pretrain <- engine <- api / demo <- cli, with
data, inference, evaluation and runtime beside the stack (they never import engine, api, demo or cli),
and no package imports another that imports it back (no cycle between packages)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mambamim"
# A package may import packages of a lower or equal level (equal only across the side packages).
LEVEL = {"atomic": 0, "ops": 1, "layers": 2, "masking": 2, "blocks": 3, "models": 4, "pretrain": 5,
         "data": 5, "runtime": 5, "inference": 6, "evaluation": 6, "engine": 7, "api": 8, "demo": 9, "cli": 10}


def _imports() -> dict[str, set[str]]:
    """package -> the mambamim packages its modules import (function-level imports included)."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).parts
        if rel == ("__init__.py",) or rel == ("__main__.py",):
            continue
        pkg = rel[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "mambamim" and len(parts) > 1 and parts[1] != pkg:
                    found.setdefault(pkg, set()).add(parts[1])
    return found


def test_every_package_has_a_level():
    assert set(_imports()) - set(LEVEL) == set(), "add the new package to LEVEL (and to docs/ARCHITECTURE.md)"


@pytest.mark.parametrize("pkg", sorted(LEVEL))
def test_no_upward_import(pkg):
    upward = sorted(t for t in _imports().get(pkg, ()) if LEVEL.get(t, 99) > LEVEL[pkg])
    assert not upward, f"mambamim.{pkg} imports {upward}, which sit above it"


def test_no_cycle_between_packages():
    graph = _imports()
    cycles = sorted((a, b) for a, targets in graph.items() for b in targets if a in graph.get(b, ()))
    assert not cycles, f"packages that import each other: {cycles}"


def _module_graph() -> dict[str, set[str]]:
    """module -> the mambamim modules it imports (``from pkg import name`` counts as pkg.name when that is
    a module, else pkg)."""
    modules = {".".join(("mambamim", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mambamim"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("mambamim")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_cycle_between_modules():
    """Not even through function-level imports (e.g. a dispatcher and its kernel importing each other)."""
    graph, state, cycle = _module_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open" and not cycle:
                cycle.extend(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycle, " -> ".join(cycle)
