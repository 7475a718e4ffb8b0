"""`homelab import [--from-docker NAME=ENDPOINT…] [--from-ollama NAME=URL…] [--litellm FILE] [--llama-swap FILE]
[-o cluster.yaml] [--force]`: write a spec from what a hand-built homelab runs now.

llama.cpp containers started by hand become models that `adopt` them (the first apply replaces each with a
managed container on the same port); Ollama's tags become ollama models; LiteLLM's model names and fallbacks and
llama-swap's models and groups add names, categories and fallbacks, which are guesses and say so. The spec is
validated before it is written, and an existing file is never overwritten without `--force` (its previous
version is kept as NAME.bak).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.commands.common import err, fail, print_diagnostics, wiring_of
from controller.core.importer import ImportError_, build_spec
from controller.effects.engine import CachingOllama
from controller.effects.importing import gather, probe_spec
from specs import SpecError
from specs.files import atomic_write
from specs.load import parse_spec, read_document, to_plain

_LINE_BREAK = re.compile("[\n\r\x85\u2028\u2029]")


def _pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for value in values:
        name, eq, where = value.partition("=")
        if not eq or not name or not where:
            fail(f"--from-{what} {value}: give NAME={'ENDPOINT' if what == 'docker' else 'URL'}")
        out.append((name, where))
    return out


def read_yaml(path: Path) -> Any:
    """An input file, read with the spec loader's limits (a regular file only, 128 KiB, 25,000 values, 32 levels,
    no recursive alias), as plain data; or one located error line."""
    try:
        doc = read_document(path, "config")
    except SpecError as exc:
        fail(str(exc.diagnostics[0]))
    data = to_plain(doc.data)
    if not isinstance(data, dict):
        fail(f"{path}:1:1: must be a mapping")
    return data


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_(
        ctx: typer.Context,
        from_docker: Annotated[
            list[str] | None, typer.Option("--from-docker", help="NAME=ENDPOINT: a node's Docker engine to read")
        ] = None,
        from_ollama: Annotated[
            list[str] | None, typer.Option("--from-ollama", help="NAME=URL: a node's Ollama server to read")
        ] = None,
        litellm: Annotated[
            Path | None,
            typer.Option("--litellm", help="A LiteLLM config.yaml (model names, fallbacks).", dir_okay=False),
        ] = None,
        llama_swap: Annotated[
            Path | None, typer.Option("--llama-swap", help="A llama-swap config.yaml (models, groups).", dir_okay=False)
        ] = None,
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the spec.", dir_okay=False)] = Path(
            "cluster.yaml"
        ),
        cluster: Annotated[str, typer.Option("--cluster", help="The cluster's name.")] = "homelab",
        force: Annotated[bool, typer.Option("--force", help="Overwrite the output (keeping NAME.bak).")] = False,
    ) -> None:
        """Write a spec from what the cluster runs now: containers started by hand, Ollama, LiteLLM, llama-swap."""
        if output.exists() and not force:
            fail(f"{output} exists; give --force to overwrite it (the old one is kept as {output.name}.bak)")
        docker_nodes = _pairs(from_docker or [], "docker")
        ollama_nodes = _pairs(from_ollama or [], "ollama")
        litellm_config = read_yaml(litellm) if litellm is not None else None
        swap_config = read_yaml(llama_swap) if llama_swap is not None else None
        try:
            probe = probe_spec(cluster, docker_nodes, ollama_nodes)
        except ValueError as exc:
            fail(f"--from-docker/--from-ollama: {exc}")
        wiring = wiring_of(ctx)
        ollama = CachingOllama(wiring.ollama)
        try:
            dfacts, ofacts = gather(
                probe, wiring.connect(probe), ollama, [n for n, _ in docker_nodes], [n for n, _ in ollama_nodes]
            )
        finally:
            ollama.close()
        sources = {k: str(v) for k, v in (("litellm", litellm), ("llama-swap", llama_swap)) if v is not None}
        skipped: list[str] = []
        warnings: list[str] = []
        try:
            text = build_spec(cluster, dfacts, ofacts, litellm_config, swap_config, sources, skipped, warnings)
        except ImportError_ as exc:
            message = _LINE_BREAK.sub(lambda m: repr(m[0])[1:-1], str(exc))  # a name's newline: still one line
            path = llama_swap if message.startswith("llama-swap") else litellm
            fail(f"{path}: {message}" if path is not None and not message.startswith("--") else message)
        try:
            parse_spec(text, output)
        except SpecError as exc:
            print_diagnostics(exc.diagnostics)
            fail(f"the imported spec does not validate; nothing written to {output}")
        try:
            atomic_write(output, text)
        except OSError as exc:
            fail(f"{output}: cannot write: {exc.strerror}")
        for note in skipped:
            err.print(f"warning: not imported: {note}", markup=False)
        for warning in warnings:
            err.print(f"warning: {warning}", markup=False)
        err.print(f"wrote {output}", markup=False)
