"""Imports point one way: engines -> nothing of livescope; bridges -> not daemon/ui; ui -> not daemon."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"engines": {"bridges", "daemon", "ui"}, "bridges": {"daemon", "ui", "engines"},
             "ui": {"daemon", "engines"}}


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
