"""One recipe for what runs where: `solver.place.place` is called from `controller/core/resolve.py` only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def place_calls(path: Path) -> list[int]:
    """Lines calling `place` imported from `solver.place` (as `place`, an alias, or `solver.place.place`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {
        a.asname or a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "solver.place"
        for a in node.names
        if a.name == "place"
    }
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Name) and f.id in names) or (
            isinstance(f, ast.Attribute) and f.attr == "place" and ast.unparse(f.value) in ("solver.place", "place")
        ):
            lines.append(node.lineno)
    return lines


def test_only_core_resolve_places() -> None:
    calls = {
        str(p.relative_to(REPO)): found
        for p in sorted((REPO / "controller").rglob("*.py"))
        if (found := place_calls(p))
    }
    assert list(calls) == ["controller/core/resolve.py"]
    assert len(calls["controller/core/resolve.py"]) == 1


def test_the_check_sees_a_call(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from solver.place import place as p\np(1)\nimport solver.place\nsolver.place.place(2)\n")
    assert place_calls(f) == [2, 4]
