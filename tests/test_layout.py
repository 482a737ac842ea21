"""Imports point one way: engines -> nothing of livescope; bridges -> not daemon/ui; ui -> not daemon."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "engines": {"bridges", "daemon", "ui"},
    "bridges": {"daemon", "ui", "engines"},
    "ui": {"daemon", "engines"},
}


def _livescope_imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 2 and node.module:  # from ..bridges import x
                found.add(node.module.split(".")[0])
            elif node.level >= 2:
                found.update(a.name.split(".")[0] for a in node.names)
            elif node.module and node.module.startswith("livescope."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("livescope."):
                    found.add(a.name.split(".")[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    bad = {}
    for path in (ROOT / package).rglob("*.py"):
        if path.parent == ROOT / "engines" / "models":
            # training scripts, run as programs (`python engines/models/train_default.py`) and
            # never imported by an engine: they may draw training frames from the sim microscope
            continue
        hits = _livescope_imports(path, package) & FORBIDDEN[package]
        if hits:
            bad[str(path.relative_to(ROOT))] = sorted(hits)
    assert not bad, f"imports against the layout: {bad}"


def test_no_engine_imports_the_training_scripts():
    scripts = {p.stem for p in (ROOT / "engines" / "models").glob("*.py")}
    for path in (ROOT / "engines").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: set[str] = set()
            if isinstance(node, ast.ImportFrom):
                names = {*(node.module or "").split("."), *(a.name for a in node.names)}
            elif isinstance(node, ast.Import):
                names = {part for a in node.names for part in a.name.split(".")}
            assert not names & scripts, (path, names & scripts)


def _module_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside functions alike (a
    function-level import hides a cycle; it does not remove it)."""
    graph: dict[str, set[str]] = {}
    for package in ("engines", "bridges", "daemon", "ui"):
        for path in (ROOT / package).glob("*.py"):
            name = f"{package}.{path.stem}"
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level == 1:  # from .x import y / from . import x
                    targets = [node.module] if node.module else [a.name for a in node.names]
                    deps.update(f"{package}.{t.split('.')[0]}" for t in targets)
                elif node.level == 2 and node.module:  # from ..bridges.x import y
                    parts = node.module.split(".")
                    deps.add(".".join(parts[:2]) if len(parts) > 1 else parts[0])
            graph[name] = {d for d in deps if d != name and not d.endswith(".__init__")}
    return graph


def test_no_import_cycles_between_modules():
    graph = _module_graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep in graph and not state.get(dep):
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
