"""`homelab ui`: the status page for a one-off look, without a running `homelab watch`.

    homelab ui [-f FILE] [--port 9465] [--bind 127.0.0.1] [--state-dir DIR]

Reads the state directory (what a watch last did, the events) and probes the cluster live on each
refresh (at most every 2 s); serves `/` and `/api/status` until Ctrl-C or SIGTERM. Read-only: every
method but GET is refused. Listens on 127.0.0.1 unless `--bind` names another address.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.commands.common import SpecFileOption, err, fail, load_or_exit, out, spec_path, wiring_of
from controller.effects.engine import STATE_ENV, state_dir
from controller.effects.status_api import collect
from controller.effects.status_http import StatusServer

DEFAULT_PORT = 9465


def register(app: typer.Typer) -> None:
    @app.command()
    def ui(
        ctx: typer.Context,
        file: SpecFileOption = None,
        port: Annotated[
            int, typer.Option("--port", help="Port to serve on (0: any free one).", min=0, max=65535)
        ] = DEFAULT_PORT,
        bind: Annotated[
            str, typer.Option("--bind", help="Address to listen on; anything but loopback is reachable by others.")
        ] = "127.0.0.1",
        state: Annotated[
            Path | None,
            typer.Option("--state-dir", help=f"Watch status and events [default: ${STATE_ENV} or watch.state_dir]"),
        ] = None,
    ) -> None:
        """Serve the read-only status page (/ and /api/status) until Ctrl-C."""
        path = spec_path(file)
        spec = load_or_exit(path).spec
        sdir = state_dir(spec, state)
        wiring = wiring_of(ctx)

        def page() -> Mapping[str, Any]:
            return collect(spec, path, sdir, wiring)

        server = StatusServer(page, on_error=lambda line: err.print(line, markup=False))
        try:
            bound = server.serve(port, bind)
        except OSError as exc:
            fail(f"--port {port}: cannot listen on {bind}: {exc.strerror}")
        host = f"[{bind}]" if ":" in bind else bind
        out.print(f"status page on http://{host}:{bound}/ (Ctrl-C to stop)", markup=False)
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.close()
        out.print("stopped", markup=False)
