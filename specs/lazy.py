"""A heavy third-party module imported on first use, so that `homelab --version`, `--help`, `validate` and
`schema` start without loading what only other commands need (Docker's SDK, OR-Tools, deepdiff …).

    if TYPE_CHECKING:
        import docker.errors
    else:
        docker = LazyModule("docker", "docker.errors")

The type checker sees the real module; at run time the first attribute read imports it (and the named
submodules) and every later read is the real module's attribute. `HEAVY` is the list the start-up test
(`tests/architecture/test_startup.py`) keeps out of the light commands.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

HEAVY = ("docker", "deepdiff", "ortools", "asyncssh", "paramiko", "pandas")
"""Imported only by the commands that use them: never by `--version`, `--help`, `validate` or `schema`."""


class LazyModule:
    """Stands for module `name` until an attribute is read; then imports it and `submodules` (full names)."""

    def __init__(self, name: str, *submodules: str) -> None:
        self._name = name
        self._submodules = submodules
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            module = importlib.import_module(self._name)
            for sub in self._submodules:
                importlib.import_module(sub)
            self._module = module
        return self._module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # copy, pickle and the REPL probe dunders: they never load the module
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"
