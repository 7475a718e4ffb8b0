"""What every `homelab` command shares: where the spec is, how errors are printed.

A user mistake is one `error: …` line (or located spec diagnostics) on stderr
and exit status 1 — never a traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from controller.effects.engine import Wiring
from specs import Diagnostic, LoadedSpec, SpecError, load_spec

DEFAULT_SPEC = "cluster.yaml"
SPEC_ENV = "HOMELAB_SPEC"

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Control characters but newline and tab: in a GGUF's metadata or a path they could retitle or clear a terminal."""


def printable(text: str) -> str:
    """`text` with control characters shown as `\\xNN`: safe to print whatever its source."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


PYDANTIC_URL = re.compile(r"\s*For further information visit https?://errors\.pydantic\.dev/\S*")
"""The line pydantic ends each of its errors with: noise to a user (the message before it says it all)."""


def without_pydantic_urls(text: str) -> str:
    return PYDANTIC_URL.sub("", text)


class _Console(Console):
    """A console that prints text as text: no markup, no `:emoji:` codes, no control characters. The few messages
    that style themselves pass `markup=True` and escape what they interpolate. On stderr (errors, warnings) no
    pydantic "For further information visit" URL either, whichever message carried it."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        clean = without_pydantic_urls if self.stderr else (lambda t: t)
        super().print(*(printable(clean(o)) if isinstance(o, str) else o for o in objects), **kwargs)


out = _Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

SpecFileOption = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        help=f"Spec file [default: ${SPEC_ENV} or ./{DEFAULT_SPEC}]",
        show_default=False,
        dir_okay=False,
    ),
]


def fail(message: str, code: int = 1, *, as_json: bool = False) -> NoReturn:
    """Print one `error:` line to stderr and exit; `as_json` (a command's `--json`): print `{"error": message}` on
    stdout instead, so that what reads the JSON reads the error too."""
    if as_json:
        out.print(json.dumps({"error": message}, ensure_ascii=False), markup=False)
    else:
        err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code)


def wiring_of(ctx: typer.Context) -> Wiring:
    """The seams this run uses: the context object a test passed (`invoke(app, args, obj=Wiring(...))`), else the
    real systems."""
    obj = ctx.find_object(Wiring)
    return obj if obj is not None else Wiring()


def spec_path(file: Path | None, positional: Path | None = None) -> Path:
    """The spec file a command works on: positional, then -f, then $HOMELAB_SPEC, then ./cluster.yaml."""
    if file is not None and positional is not None and file != positional:
        fail(f"two spec files given: {positional} and -f {file}")
    chosen = positional or file
    if chosen is not None:
        return chosen
    env = os.environ.get(SPEC_ENV)
    return Path(env) if env else Path(DEFAULT_SPEC)


def print_diagnostics(diagnostics: tuple[Diagnostic, ...] | list[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        err.print(str(diagnostic), markup=False)


def load_or_exit(path: Path, *, as_json: bool = False) -> LoadedSpec:
    """Load and validate the spec, or print every error and exit 1 (`as_json`: `{"error": "N errors in PATH",
    "diagnostics": [...]}` on stdout)."""
    try:
        loaded = load_spec(path)
    except SpecError as exc:
        n = len(exc.diagnostics)
        summary = f"{n} error{'s' if n != 1 else ''} in {path}"
        if as_json:
            doc = {"error": summary, "diagnostics": [str(d) for d in exc.diagnostics]}
            out.print(json.dumps(doc, ensure_ascii=False), markup=False)
            raise typer.Exit(1) from None
        print_diagnostics(exc.diagnostics)
        err.print(summary, markup=False)
        raise typer.Exit(1) from None
    print_diagnostics(loaded.warnings)
    return loaded
