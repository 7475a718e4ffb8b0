"""The `homelab` command line.

Every command that reads a spec takes `-f FILE` (default `./cluster.yaml`, or
`$HOMELAB_SPEC`). A user mistake — a missing file, bad YAML, an invalid spec —
is reported as located one-line errors on stderr with exit status 1, never a
traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from controller.commands import (
    discover,
    estimate,
    gateway,
    health,
    import_,
    place,
    reconcile,
    recover,
    route,
    status,
    ui,
    wake,
    watch,
)
from controller.commands.common import SpecFileOption, err, fail, load_or_exit, out, spec_path
from specs.errors import HomelabError
from specs.files import atomic_write
from specs.schema import json_schema_text
from specs.units import format_size

app = typer.Typer(
    name="homelab",
    help="Declarative reconciliation controller for homelab LLM inference clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"homelab {version('homelab-cluster')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            out.print("homelab (not installed)")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Declarative reconciliation controller for homelab LLM inference clusters."""


@app.command()
def validate(
    spec: Annotated[
        Path | None, typer.Argument(help="Spec file (same as -f)", show_default=False, dir_okay=False)
    ] = None,
    file: SpecFileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the validated spec as JSON.")] = False,
) -> None:
    """Check a spec: syntax, types, unknown keys and cross-references. Exit 1 on any error."""
    path = spec_path(file, spec)
    loaded = load_or_exit(path)
    s = loaded.spec
    if as_json:
        out.print(json.dumps(s.model_dump(mode="json"), indent=2), markup=False)
        return
    gpus = [gpu for node in s.nodes for gpu in node.gpus]
    vram = sum(gpu.vram for gpu in gpus)
    gateway = f", gateway on port {s.gateway.port}" if s.gateway is not None else ""
    out.print(
        f"{path}: valid — cluster '{s.cluster.name}': {len(s.nodes)} node{'s' if len(s.nodes) != 1 else ''},"
        f" {len(gpus)} GPU{'s' if len(gpus) != 1 else ''} ({format_size(vram)}),"
        f" {len(s.models)} model{'s' if len(s.models) != 1 else ''}{gateway}",
        markup=False,
    )


@app.command()
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.", dir_okay=False)
    ] = None,
) -> None:
    """Print the JSON Schema of the spec (for editors: `# yaml-language-server: $schema=...`)."""
    text = json_schema_text()
    if output is None:
        sys.stdout.write(text)
        return
    try:
        atomic_write(output, text)
    except OSError as exc:
        fail(f"{output}: cannot write: {exc.strerror}")
    err.print(f"wrote {output}", markup=False)


for command in (
    estimate,
    place,
    reconcile,
    status,
    gateway,
    discover,
    health,
    route,
    recover,
    wake,
    watch,
    ui,
    import_,
):
    command.register(app)


def _die(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    raise SystemExit(1)


def main() -> None:
    """The console script. Exit status: 0 done (for `reconcile --dry-run`: no changes), 2 changes pending (dry run)
    or a DOWN verdict (`health`), 1 any error — a user-facing error (`specs.errors.HomelabError`) a command did not
    report itself, and a usage error (an unknown option, a bad value) too, so that a script never mistakes a
    typo for "changes pending". Each is one `error:` line, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except HomelabError as exc:
        _die(str(exc) or type(exc).__name__)
    except OSError as exc:  # a file or directory the user named: missing, not writable, not a directory
        where = f"{exc.filename}: " if exc.filename else ""
        _die(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        raise SystemExit(130) from None
    except Exception as exc:
        message = getattr(exc, "format_message", None)
        if not callable(message):  # not a command-line (click) error: a bug, shown as one
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            out.print(ctx.get_help(), markup=False)
            raise SystemExit(0) from None
        if type(exc).__name__ == "Abort":
            _die("aborted")
        usage = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _die(f"{message()}{usage}")
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
