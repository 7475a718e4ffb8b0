"""`homelab wake NODE`: wake a node (homelab's sleep or not) and bring its containers back.

The node's `wake` (a Wake-on-LAN packet, or its wake command with the secret on stdin), then recovery's machine
from there: wait for SSH and Docker, restart the node's containers one at a time, each healthy before the
next, and check again. The node is awake in the power state afterwards, so the gateway stops waking it and the
watch starts counting its idle time again. Exit status: 0 awake, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.commands.common import SpecFileOption, err, fail, load_or_exit, out, spec_path, wiring_of
from controller.core.state import ClusterState
from controller.drivers.secrets import Redactor
from controller.effects.apply import EVENTS_FILE, EventLog
from controller.effects.engine import Session, state_dir
from controller.effects.power import wake_node
from specs.errors import HomelabError


def register(app: typer.Typer) -> None:
    @app.command()
    def wake(
        ctx: typer.Context,
        node: Annotated[str, typer.Argument(help="The node to wake")],
        file: SpecFileOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
        state: Annotated[
            Path | None,
            typer.Option("--state-dir", help="Events and power state [default: $HOMELAB_STATE_DIR or watch.state_dir]"),
        ] = None,
    ) -> None:
        """Wake a node and restart its containers one at a time, health-gated."""
        spec = load_or_exit(spec_path(file)).spec
        names = [n.name for n in spec.nodes]
        if node not in names:
            fail(f"unknown node '{node}' (nodes: {', '.join(names)})")
        target = spec.node(node)
        if target.wake is None:
            fail(f"node '{node}' has no `wake` section: nothing can wake it (wake: {{wol: …}} or {{command: …}})")
        wiring = wiring_of(ctx)
        sdir = state_dir(spec, state)
        try:  # what runs where, as `reconcile` places it: the containers to bring back
            with Session(spec, wiring, sdir) as session:
                desired: ClusterState | None = session.resolve().desired()
        except (HomelabError, OSError):
            desired = None
        log = EventLog(sdir / EVENTS_FILE)

        def emit(event: str, **fields: Any) -> None:
            record = log.emit(event, **fields)
            if not as_json and event in ("node-waking", "recovery-step", "node-awake"):
                what = record.get("action") or record.get("reason") or ""
                out.print(f"{node}: {event.removeprefix('recovery-')} {record.get('step', '')} {what}".rstrip(),
                          markup=False)  # fmt: skip

        try:
            outcome = asyncio.run(wake_node(spec, target, sdir, wiring, desired, emit=emit, redactor=Redactor()))
        finally:
            log.close()
        if as_json:
            out.print(json.dumps(outcome.to_json(), indent=2), markup=False)
        else:
            (out if outcome.ok else err).print(outcome.message, markup=False)
        if not outcome.ok:
            raise typer.Exit(1)
