"""`homelab watch`: keep the cluster matching the spec — on every save, every interval, every new commit.

watch [-f FILE]                                   reconcile at start-up, at each save of FILE, every interval
watch --git URL [--branch main] [--path cluster.yaml]   a local clone, fetched every interval, applied per commit
watch --dry-run                                   print the plans, apply nothing

SIGTERM or SIGINT: the step in progress finishes, the lock is released, exit 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.commands.common import SpecFileOption, err, fail, out, spec_path, wiring_of
from controller.effects.engine import STATE_ENV, state_dir
from controller.effects.status_api import collect
from controller.effects.watch import (
    FileSource,
    GitSource,
    Metrics,
    SourceError,
    WatchLoop,
    Worker,
    clone_dir,
    serve,
)
from specs.model import Watch
from specs.units import parse_duration


def _say(line: str, is_error: bool) -> None:
    (err if is_error else out).print(line, markup=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def watch(
        ctx: typer.Context,
        file: SpecFileOption = None,
        git_url: Annotated[
            str | None, typer.Option("--git", help="Watch this git repository (URL or path) instead of a file.")
        ] = None,
        branch: Annotated[str, typer.Option("--branch", help="Git mode: the branch to follow.")] = "main",
        path: Annotated[str, typer.Option("--path", help="Git mode: the spec's path in the repository.")] = (
            "cluster.yaml"
        ),
        interval: Annotated[
            str | None,
            typer.Option(
                "--interval", help="Drift check, health and git fetch every (e.g. 30s) [default: watch.interval]"
            ),
        ] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plans; apply nothing.")] = False,
        allow_spec_commands: Annotated[
            bool,
            typer.Option(
                "--allow-spec-commands",
                help="Git mode: accept keys that run commands or choose files to write (`cmd:` secrets, wake,"
                " restart and gateway commands, gateway.config_path, watch.state_dir) from the repository's spec.",
            ),
        ] = False,
        metrics_port: Annotated[
            int | None,
            typer.Option(
                "--metrics-port",
                help="Serve Prometheus /metrics here (0: any free port) [default: watch.metrics_port]",
                min=0,
                max=65535,
            ),
        ] = None,
        metrics_host: Annotated[
            str, typer.Option("--metrics-host", help="Address /metrics and the status page (/) listen on.")
        ] = "127.0.0.1",
        state: Annotated[
            Path | None,
            typer.Option("--state-dir", help=f"Events, status, lock, clone [default: ${STATE_ENV} or watch.state_dir]"),
        ] = None,
    ) -> None:
        """Reconcile continuously: at start-up, on every save of the spec (or new commit), and every interval."""
        fixed_interval: float | None = None
        if interval is not None:
            try:
                fixed_interval = parse_duration(interval)
            except ValueError as exc:
                fail(f"--interval: {exc}")
            if fixed_interval <= 0:
                fail("--interval must be > 0")
        source: FileSource | GitSource
        if git_url is not None:
            if file is not None:
                fail("--git and -f: choose one (in git mode the spec is --path in the repository)")
            sdir = state_dir(None, state)
            source = GitSource(git_url, branch, path, clone_dir(sdir, git_url, branch))
            try:
                source.open()
            except SourceError as exc:
                fail(f"git: {exc}")
            out.print(f"watching {source.shown_url} ({branch}) {path} at {source.head[:12]}", markup=False)
            state = state if state is not None else sdir
        else:
            source = FileSource(spec_path(file))
            out.print(f"watching {source.path}", markup=False)
        metrics = Metrics()
        worker = Worker(source, state, dry_run, metrics, _say, wiring_of(ctx), allow_spec_commands)

        def current_interval() -> float:
            if fixed_interval is not None:
                return fixed_interval
            return worker.good.loaded.spec.watch.interval if worker.good is not None else Watch().interval

        loop = WatchLoop(worker, current_interval, git=git_url is not None)
        port = metrics_port
        if port is None:
            first = worker.refresh_spec()
            port = first.loaded.spec.watch.metrics_port if first is not None else None

        def page() -> Mapping[str, Any]:
            good = worker.good
            if good is None:
                return {"cluster": "?", "generated": time.time(), "warnings": ["no valid spec yet"]}
            spec = good.loaded.spec
            return collect(spec, source.spec_path, worker.state_dir(spec), worker.wiring)

        if port is not None:
            try:
                bound = metrics.serve(port, metrics_host, status=page)
            except OSError as exc:
                fail(f"--metrics-port {port}: cannot listen on {metrics_host}: {exc.strerror}")
            out.print(f"metrics on http://{metrics_host}:{bound}/metrics", markup=False)
            out.print(f"status page on http://{metrics_host}:{bound}/", markup=False)
        try:
            asyncio.run(
                serve(loop, watch_path=source.path if isinstance(source, FileSource) else None, handle_signals=True)
            )
        finally:
            metrics.close()
        out.print("watch stopped", markup=False)
