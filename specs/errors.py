"""Located diagnostics: every problem in a spec names its file, line, column and path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

PathPart = str | int
Path = tuple[PathPart, ...]


def format_path(path: Sequence[PathPart]) -> str:
    """`('models', 2, 'context')` → `models[2].context`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = str(part)
    return out or "(document)"


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in a spec file. `line` and `column` are 1-based; 0 means unknown."""

    file: str
    line: int
    column: int
    path: Path
    message: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.column}"
        prefix = "warning: " if self.severity is Severity.WARNING else ""
        if self.path:
            return f"{where}: {prefix}{format_path(self.path)}: {self.message}"
        return f"{where}: {prefix}{self.message}"


class HomelabError(Exception):
    """The base of every error a user can cause or meet: a spec, a GGUF file, a node, a plan.

        HomelabError
         ├── specs.SpecError                  the spec does not load (located diagnostics)
         ├── solver.errors.GGUFError          a GGUF file is missing, not GGUF, or malformed
         ├── solver.errors.EstimateError      an estimator parameter is out of range
         ├── controller.drivers.base.DriverError   a node, engine, server or secret did not do what was asked
         ├── controller.core.desired.RenderError   the placement cannot be rendered as containers
         ├── controller.core.gateway_config.GatewayError
         ├── controller.core.routing.RouteError
         ├── controller.effects.apply.LockHeld     another apply holds the lock
         └── controller.effects.watch.SourceError  the watched git source failed

    Its message is one line fit for a user; the command line prints it as `error: MESSAGE` with exit
    status 1 (`controller.cli.main`), never a traceback, and `homelab watch` reports it and goes on.
    """


class SpecError(HomelabError):
    """A spec could not be loaded: the file is missing, unreadable, not YAML or not valid.

    `diagnostics` holds every error found in one run, each located in the file.
    """

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))
