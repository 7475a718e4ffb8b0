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

from controller import reconcile_cmd
from controller.apply import EVENTS_FILE, EventLog
from controller.cliutil import SpecFileOption, err, fail, load_or_exit, out, spec_path
from controller.drivers.base import DriverError
from controller.recovery import (
    STATE_FILE,
    AttemptStore,
    NodeActions,
    Observation,
    Outcome,
    Reach,
    Recoverer,
    Status,
    Step,
    due,
    predicted_path,
)
from controller.secrets import Redactor
from controller.state import ClusterState
from specs.model import ClusterSpec, Node


def _desired(spec: ClusterSpec) -> ClusterState | None:
    from controller.health_cmd import desired_state

    try:
        return desired_state(spec)
    except (ValueError, OSError):
        return None


def _actions(
    spec: ClusterSpec, node: Node, state: Path, desired: ClusterState | None, redactor: Redactor
) -> NodeActions:
    return NodeActions(
        spec, node, state, connect=reconcile_cmd.connect_factory(spec), desired=desired, redactor=redactor
    )


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
                names, _ = await asyncio.to_thread(actions.node_plan_steps)
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
        state_dir = reconcile_cmd.state_dir(spec, state)
        redactor = Redactor()
        desired = _desired(spec)
        store = AttemptStore(state_dir / STATE_FILE)
        by_hand = bool(nodes)
        if by_hand:
            chosen = [spec.node(n) for n in nodes or []]
        else:
            chosen, skipped = _down_and_due(spec, desired, store)
            for line in skipped:
                err.print(line, markup=False)
        if not chosen:
            if as_json:
                out.print(json.dumps({"nodes": []}), markup=False)
            else:
                out.print("nothing to recover", markup=False)
            return

        if dry_run:
            results = asyncio.run(_dry_runs(spec, chosen, state_dir, desired, redactor))
            if as_json:
                out.print(json.dumps({"dry_run": True, "nodes": results}, indent=2), markup=False)
            else:
                for r in results:
                    _print_dry_run(r)
            return

        log = EventLog(state_dir / EVENTS_FILE)
        show = _printer(as_json)

        def emit(event: str, **fields: Any) -> None:
            show(log.emit(event, **fields))

        try:
            outcomes = asyncio.run(_run_all(spec, chosen, state_dir, desired, redactor, store, emit, by_hand))
        finally:
            log.close()
        if as_json:
            out.print(json.dumps({"nodes": [o.to_json() for o in outcomes]}, indent=2), markup=False)
        else:
            for o in outcomes:
                (out if o.ok else err).print(o.message, markup=False)
        if not all(o.ok for o in outcomes):
            raise typer.Exit(1)


def _down_and_due(spec: ClusterSpec, desired: ClusterState | None, store: AttemptStore) -> tuple[list[Node], list[str]]:
    from controller.health import Status as ProbeStatus
    from controller.health import check

    report = check(spec, desired)
    down = {p.endpoint.node for p in report.probes if p.status is ProbeStatus.DOWN and p.endpoint.tier != "gateway"}
    records = store.load()
    chosen: list[Node] = []
    skipped: list[str] = []
    now = time.time()
    for node in spec.nodes:
        if node.name not in down:
            if node.name in records:
                store.put(node.name, None)  # it came back: its failure count no longer applies
            continue
        if not spec.recovery.enabled:
            skipped.append(f"node {node.name}: DOWN; recovery is disabled (recovery.enabled: false)")
            continue
        ok, why = due(records.get(node.name), node, now)
        if ok:
            chosen.append(node)
        else:
            skipped.append(f"node {node.name}: DOWN; {why}")
    return chosen, skipped


async def _dry_runs(
    spec: ClusterSpec, chosen: list[Node], state_dir: Path, desired: ClusterState | None, redactor: Redactor
) -> list[dict[str, Any]]:
    async def one(node: Node) -> dict[str, Any]:
        actions = _actions(spec, node, state_dir, desired, redactor)
        return await _dry_run(actions, Recoverer(node, spec, actions), redactor)

    return list(await asyncio.gather(*(one(n) for n in chosen)))


async def _run_all(
    spec: ClusterSpec,
    chosen: list[Node],
    state_dir: Path,
    desired: ClusterState | None,
    redactor: Redactor,
    store: AttemptStore,
    emit: Any,
    by_hand: bool,
) -> list[Outcome]:
    async def one(node: Node) -> Outcome:
        actions = _actions(spec, node, state_dir, desired, redactor)
        recoverer = Recoverer(node, spec, actions, emit=emit, store=store, redact=redactor)
        try:
            return await recoverer.run(once=not by_hand, resume=not by_hand)
        except Exception as exc:  # one node's failure never stops the others
            message = redactor(f"node {node.name}: recovery failed: {exc or type(exc).__name__}")
            return Outcome(node.name, Status.FAILED, 0, message)

    return list(await asyncio.gather(*(one(n) for n in chosen)))
