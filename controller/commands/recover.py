"""`homelab recover`: bring DOWN nodes back (SSH, Docker restart, wake-up, containers), or show how.

recover NODE... [--dry-run]   by hand: probe, then run (or print) the steps; attempts start again from 1
recover [--dry-run]           the nodes with an endpoint DOWN, each when its backoff is due (for cron / a watch loop)

Exit status: 0 every node healthy or recovered (and always for --dry-run), 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.commands.common import SpecFileOption, err, fail, load_or_exit, out, spec_path, wiring_of
from controller.core.state import ClusterState
from controller.drivers.base import DriverError
from controller.drivers.secrets import Redactor
from controller.effects.apply import EVENTS_FILE, EventLog
from controller.effects.engine import Session, Wiring, state_dir
from controller.effects.health import Status as ProbeStatus
from controller.effects.power import asleep_nodes
from controller.effects.recovery import (
    STATE_FILE,
    AttemptStore,
    NodeActions,
    Observation,
    Reach,
    Recoverer,
    Step,
    due_nodes,
    node_actions,
    predicted_path,
    run_all,
)
from specs.errors import HomelabError
from specs.model import ClusterSpec, Node


def _desired(spec: ClusterSpec, wiring: Wiring, sdir: Path) -> ClusterState | None:
    """What runs where, as `reconcile` places it (None when it cannot be worked out now)."""
    try:
        with Session(spec, wiring, sdir) as session:
            return session.resolve().desired()
    except (HomelabError, OSError):
        return None


def _observed_words(obs: Observation) -> str:
    ssh = {None: "?", Reach.UP: "up"}.get(obs.ssh, obs.ssh.value if obs.ssh else "?")
    docker = "up" if obs.docker else "down"
    health = "healthy" if obs.healthy else "unhealthy"
    return f"SSH {ssh}, Docker {docker}, {health}" + (f" ({obs.detail})" if obs.detail else "")


async def _dry_run(actions: NodeActions, recoverer: Recoverer, redactor: Redactor) -> dict[str, Any]:
    first = await actions.probe()
    path = predicted_path(first, recoverer.abilities)
    steps: list[dict[str, Any]] = []
    for decision in path:
        entry: dict[str, Any] = {"step": decision.step.value, "why": redactor(decision.reason)}
        if decision.step not in (Step.DONE, Step.RETRY, Step.GIVE_UP):
            entry["action"] = actions.describe(decision.step)
        if decision.step is Step.RESTART_CONTAINERS and first.docker:
            try:
                names = await asyncio.to_thread(actions.planned_steps)
                entry["plan"] = names
            except DriverError as exc:
                entry["plan_error"] = redactor(str(exc))
        steps.append(entry)
    return {"node": actions.node.name, "observed": redactor(_observed_words(first)), "steps": steps}


def _print_dry_run(result: dict[str, Any]) -> None:
    out.print(f"node {result['node']}: {result['observed']}", markup=False)
    n = 0
    for s in result["steps"]:
        if "action" not in s:
            out.print(f"  then: {s['step']} ({s['why']})", markup=False)
            continue
        n += 1
        out.print(f"  {n}. {s['step']}: {s['action']}  ({s['why']})", markup=False)
        for name in s.get("plan", []):
            out.print(f"       {name}", markup=False)
        if "plan_error" in s:
            out.print(f"       (cannot plan the containers now: {s['plan_error']})", markup=False)


def _printer(as_json: bool) -> Any:
    def show(record: dict[str, Any]) -> None:
        if as_json:
            return
        event = record["event"]
        if event == "recovery-step" and record["step"] != Step.PROBE.value:
            out.print(f"{record['node']}: {record['step']}: {record['action']}", markup=False)
        elif event == "recovery-observed" and record.get("detail") and not record["ok"]:
            err.print(f"{record['node']}: {record['step']}: {record['detail']}", markup=False)
        elif event == "recovery-retry":
            err.print(record["message"], markup=False)

    return show


def register(app: typer.Typer) -> None:
    @app.command()
    def recover(
        ctx: typer.Context,
        nodes: Annotated[
            list[str] | None, typer.Argument(help="Nodes to recover [default: every DOWN node that is due]")
        ] = None,
        file: SpecFileOption = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Probe and print the steps; change nothing.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
        state: Annotated[
            Path | None,
            typer.Option("--state-dir", help="Events and attempts [default: $HOMELAB_STATE_DIR or watch.state_dir]"),
        ] = None,
    ) -> None:
        """Recover nodes: restart Docker over SSH, wake sleeping nodes, restart their containers."""
        spec = load_or_exit(spec_path(file)).spec
        known = {n.name for n in spec.nodes}
        for name in nodes or []:
            if name not in known:
                fail(f"unknown node '{name}' (nodes: {', '.join(n.name for n in spec.nodes)})")
        wiring = wiring_of(ctx)
        sdir = state_dir(spec, state)
        redactor = Redactor()
        desired = _desired(spec, wiring, sdir)
        store = AttemptStore(sdir / STATE_FILE)
        by_hand = bool(nodes)
        if by_hand:
            chosen = [spec.node(n) for n in nodes or []]
        else:
            report = wiring.health(spec, desired)
            down = {
                p.endpoint.node
                for p in report.probes
                if p.status is ProbeStatus.DOWN and p.endpoint.node is not None and p.endpoint.tier != "gateway"
            }
            chosen, skipped = due_nodes(spec, down, store, time.time(), asleep_nodes(spec, sdir))
            for line in skipped:
                err.print(line, markup=False)
        if not chosen:
            if as_json:
                out.print(json.dumps({"nodes": []}), markup=False)
            else:
                out.print("nothing to recover", markup=False)
            return

        if dry_run:
            results = asyncio.run(_dry_runs(spec, chosen, sdir, wiring, desired, redactor))
            if as_json:
                out.print(json.dumps({"dry_run": True, "nodes": results}, indent=2), markup=False)
            else:
                for r in results:
                    _print_dry_run(r)
            return

        log = EventLog(sdir / EVENTS_FILE)
        show = _printer(as_json)

        def emit(event: str, **fields: Any) -> None:
            show(log.emit(event, **fields))

        try:
            outcomes = asyncio.run(
                run_all(spec, chosen, sdir, wiring, desired, store=store, emit=emit, redactor=redactor, by_hand=by_hand)
            )
        finally:
            log.close()
        if as_json:
            out.print(json.dumps({"nodes": [o.to_json() for o in outcomes]}, indent=2), markup=False)
        else:
            for o in outcomes:
                (out if o.ok else err).print(o.message, markup=False)
        if not all(o.ok for o in outcomes):
            raise typer.Exit(1)


async def _dry_runs(
    spec: ClusterSpec,
    chosen: list[Node],
    sdir: Path,
    wiring: Wiring,
    desired: ClusterState | None,
    redactor: Redactor,
) -> list[dict[str, Any]]:
    async def one(node: Node) -> dict[str, Any]:
        actions = node_actions(spec, node, sdir, wiring, desired, redactor)
        return await _dry_run(actions, Recoverer(node, spec, actions), redactor)

    return list(await asyncio.gather(*(one(n) for n in chosen)))
