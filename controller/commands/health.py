"""`homelab health`: a table per tier, the verdicts and the prognosis; exit 0/1/2 for cron and scripts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from controller.commands.common import SpecFileOption, fail, load_or_exit, out, spec_path, wiring_of
from controller.core.state import ClusterState
from controller.effects.engine import HealthProbe, Session, state_dir
from controller.effects.health import EXIT_CODES, HealthReport, Status, mark_asleep
from controller.effects.power import asleep_nodes
from specs.errors import HomelabError
from specs.model import ClusterSpec

STATUS_STYLE = {
    Status.UP: "green",
    Status.SLOW: "yellow",
    Status.STARTING: "yellow",
    Status.IDLE: "blue",
    Status.DOWN: "red",
    Status.ASLEEP: "blue",
}


def render_report(report: HealthReport) -> None:
    for tier in report.tiers:
        table = Table(title=f"{tier.tier}: {tier.verdict.value}", title_justify="left")
        table.add_column("endpoint", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("code", justify="right")
        table.add_column("latency", justify="right", no_wrap=True)
        table.add_column("error", overflow="fold")
        for p in tier.probes:
            latency = f"{p.latency * 1000:.0f} ms" if p.latency is not None else ""
            table.add_row(
                p.endpoint.name,
                Text(p.status.value, style=STATUS_STYLE[p.status]),
                str(p.code) if p.code is not None else "",
                latency,
                p.error or "",
            )
        out.print(table)
    out.print(f"prognosis: {report.verdict.value} — {report.reason}", markup=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def health(
        ctx: typer.Context,
        file: SpecFileOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
        watch: Annotated[
            float | None, typer.Option("--watch", help="Check again every SECONDS until interrupted.", min=0.5)
        ] = None,
    ) -> None:
        """Probe every endpoint; exit 0 HEALTHY (or ASLEEP), 1 DEGRADED, 2 DOWN."""
        path: Path = spec_path(file)
        spec = load_or_exit(path).spec
        wiring = wiring_of(ctx)
        try:  # what runs where, as `reconcile` places it (the containers seen running keep their place and port)
            with Session(spec, wiring) as session:
                desired = session.resolve().desired()
        except HomelabError as exc:
            fail(str(exc))
        report = _once(wiring.health, spec, desired, as_json)
        while watch is not None:
            try:
                time.sleep(watch)
            except KeyboardInterrupt:
                break
            report = _once(wiring.health, spec, desired, as_json)
        raise typer.Exit(EXIT_CODES[report.verdict])


def _once(check: HealthProbe, spec: ClusterSpec, desired: ClusterState, as_json: bool) -> HealthReport:
    # a node homelab put to sleep on purpose is ASLEEP (exit 0), not DOWN
    report = mark_asleep(check(spec, desired), asleep_nodes(spec, state_dir(spec, None)))
    if as_json:
        out.print(json.dumps(report.to_json(), indent=2), markup=False)
    else:
        render_report(report)
    return report
