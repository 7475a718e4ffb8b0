"""The layering of `controller/` (README: Architecture), enforced on the source with `ast`.

    specs ← solver ← controller.core ← controller.drivers ← controller.effects ← controller.commands ← controller.cli

- `controller.core` is pure: it imports only itself, `solver` and `specs`.
- A driver imports only `controller.core.state`, other drivers and `specs` (one file per outside system).
- `controller.effects` imports core, drivers, other effects, `solver` and `specs` — never the commands.
- `controller.commands` import anything below them, never `controller.cli` and never each other (one command
  per module), except the shared `commands.common`.
- No first-party import inside a function (an import moved into a function to dodge a cycle hides the cycle),
  and no cycle between modules.
- No heavy third-party library (`specs.lazy.HEAVY`) imported when a module is: it is a `specs.lazy.LazyModule`
  (imported on first use; the real import only under `TYPE_CHECKING`), so that the light commands start fast
  (`tests/architecture/test_startup.py` checks the result in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from specs.lazy import HEAVY

REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("specs", "solver", "controller")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in FIRST_PARTY for p in sorted((REPO / pkg).rglob("*.py"))}


def imports(path: Path) -> Iterator[tuple[str, bool, int]]:
    """(imported first-party module, inside a function or class body, line) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for inner in ast.walk(node):
                if inner is not node:
                    nested.add(id(inner))
    known = modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            # `from controller.commands import watch` imports the module controller.commands.watch
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] in FIRST_PARTY:
                yield name, id(node) in nested, node.lineno


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "controller":
        return parts[0]
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1]


ALLOWED: dict[str, set[str]] = {
    "specs": {"specs"},
    "solver": {"solver", "specs"},
    "core": {"core", "solver", "specs"},
    "drivers": {"drivers", "specs"},  # and controller.core.state, checked below
    "effects": {"effects", "drivers", "core", "solver", "specs"},
    "commands": {"commands", "effects", "drivers", "core", "solver", "specs"},
    "cli": {"cli", "commands", "effects", "drivers", "core", "solver", "specs"},
}


def edges() -> list[tuple[str, str, bool, int]]:
    return [(mod, target, nested, line) for mod, path in modules().items() for target, nested, line in imports(path)]


def test_no_upward_import() -> None:
    wrong = []
    for mod, target, _, line in edges():
        src, dst = layer(mod), layer(target)
        if dst not in ALLOWED[src] and not (src == "drivers" and target == "controller.core.state"):
            wrong.append(f"{mod}:{line} imports {target} ({src} → {dst})")
    assert wrong == []


def test_a_command_does_not_import_another_command() -> None:
    wrong = [
        f"{mod}:{line} imports {target}"
        for mod, target, _, line in edges()
        if layer(mod) == "commands" and target.startswith("controller.commands.")
        and target not in ("controller.commands.common", mod)
    ]  # fmt: skip
    assert wrong == []


def test_no_first_party_import_inside_a_function() -> None:
    wrong = [f"{mod}:{line} imports {target} inside a function" for mod, target, nested, line in edges() if nested]
    assert wrong == []


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {}
    known = modules()
    for mod, target, _, _ in edges():
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]  # `from a.b import name` → a.b
        if target != mod:
            graph.setdefault(mod, set()).add(target)
    seen: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if seen.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in seen:
                visit(nxt, [*stack, nxt])
        seen[node] = 2

    for mod in sorted(graph):
        if mod not in seen:
            visit(mod, [mod])
    assert cycles == []


def eager_imports(path: Path) -> Iterator[tuple[str, int]]:
    """(third-party top-level package, line) for each import run when the module is imported: at module level,
    in any block but an `if TYPE_CHECKING:` one, not inside a function or class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(body: list[ast.stmt]) -> Iterator[tuple[str, int]]:
        for node in body:
            if isinstance(node, ast.Import):
                yield from ((a.name.split(".")[0], node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
                yield node.module.split(".")[0], node.lineno
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    yield from walk(part)
            elif isinstance(node, ast.With):
                yield from walk(node.body)

    yield from walk(tree.body)


def test_no_heavy_library_imported_at_module_level() -> None:
    wrong = [
        f"{mod}:{line} imports {name} when it is imported (use specs.lazy.LazyModule)"
        for mod, path in modules().items()
        for name, line in eager_imports(path)
        if name in HEAVY
    ]
    assert wrong == []


@pytest.mark.parametrize(
    "package", ["specs", "solver", "controller.core", "controller.drivers", "controller.effects", "controller.commands"]
)
def test_each_package_imports_alone(package: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import importlib, pkgutil, {package} as p\n"
         "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'): importlib.import_module(m.name)"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The checks are not vacuous: an upward import and an import inside a function are found in a sample."""
    sample = tmp_path / "sample.py"
    sample.write_text("from controller.commands.common import out\n\ndef f():\n    from controller.cli import app\n")
    found = list(imports(sample))
    assert ("controller.commands.common", False, 1) in found
    assert ("controller.cli", True, 4) in found
    assert layer("controller.core.state") == "core" and "commands" not in ALLOWED["core"]
    heavy = tmp_path / "heavy.py"
    heavy.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import docker\nelse:\n    docker = 1\n"
        "with open('x'):\n    import deepdiff.diff\ndef f():\n    import ortools\n"
    )
    assert list(eager_imports(heavy)) == [("typing", 1), ("deepdiff", 7)]
