"""`homelab reconcile` (and its `--dry-run`).

reconcile --dry-run   print the plan; exit 0 nothing to do, 2 changes (or nodes not observed), 1 error
reconcile [--yes]     apply it (asks first); --plan FILE applies exactly a saved plan, if still current
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

from controller.commands.common import SpecFileOption, err, fail, load_or_exit, out, spec_path, wiring_of
from controller.core.plan import Plan, render_text
from controller.drivers.base import DriverError
from controller.effects.apply import LockHeld, LockUnavailable
from controller.effects.engine import STATE_ENV, Prepared, Session, state_dir
from solver.explain import gib
from specs.files import atomic_write
from specs.model import ClusterSpec


def placement_summary(prepared: Prepared) -> list[str]:
    lines = ["Placement:"]
    for g in prepared.placement.gpus:
        used = [a for a in prepared.placement.assignments if a.node == g.node and g.index in a.gpus and not a.on_demand]
        pct = 100 * g.used_bytes / g.capacity_bytes if g.capacity_bytes else 0
        shares = [f"{a.model} {a.gpu_layers}/{a.layers}" for a in used]
        shares += [
            f"swap pool {p.size_bytes / 2**30:.1f} GiB [{', '.join(p.members)}] max {p.max_loaded} loaded"
            for p in prepared.placement.pools
            if p.node == g.node and p.gpu == g.index
        ]
        models = ", ".join(shares) or "nothing"
        lines.append(
            f"  {g.node} GPU {g.index}: {g.used_bytes / 2**30:.1f} of {g.capacity_bytes / 2**30:.1f} GiB"
            f" ({pct:.0f}%): {models}"
        )
    cpu = [a for a in prepared.placement.assignments if not a.gpus and not a.on_demand]
    for a in cpu:
        lines.append(f"  {a.node} CPU: {a.model} ({gib(a.ram_bytes)} RAM)")
    for p in prepared.placement.pools:
        if p.gpu is None:
            lines.append(
                f"  {p.node} CPU: swap pool [{', '.join(p.members)}] max {p.max_loaded} loaded ({gib(p.ram_bytes)} RAM)"
            )
    for u in prepared.placement.unplaced:
        lines.append(f"  not placed: {u.reason}")
    if prepared.gpus is not None:
        lines.extend(f"  {note}" for note in prepared.gpus.notes)
    lines.extend(f"  {line}" for line in prepared.calibration)
    return lines


def register(app: typer.Typer) -> None:
    @app.command()
    def reconcile(
        ctx: typer.Context,
        file: SpecFileOption = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Print the plan and exit (0 none, 2 changes).")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
        out_file: Annotated[
            Path | None, typer.Option("--out", help="Save the plan to this file (with --dry-run).", dir_okay=False)
        ] = None,
        plan_file: Annotated[
            Path | None, typer.Option("--plan", help="Apply exactly this saved plan.", dir_okay=False)
        ] = None,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
        state: Annotated[
            Path | None,
            typer.Option("--state-dir", help=f"Events and lock [default: ${STATE_ENV} or watch.state_dir]"),
        ] = None,
    ) -> None:
        """Make the cluster match the spec: observe, place, diff, plan, apply."""
        spec = load_or_exit(spec_path(file)).spec
        with Session(spec, wiring_of(ctx), state_dir(spec, state)) as session:
            _reconcile(session, dry_run, as_json, out_file, plan_file, yes)


def _reconcile(
    session: Session, dry_run: bool, as_json: bool, out_file: Path | None, plan_file: Path | None, yes: bool
) -> None:
    spec = session.spec
    try:
        prepared = session.prepare()
    except DriverError as exc:
        fail(str(exc))
    if prepared.gpus is not None:
        for warning in prepared.gpus.warnings:
            err.print(f"warning: {warning}", markup=False)
    for warning in prepared.calibration_warnings:
        err.print(f"warning: {warning}", markup=False)
    for note in prepared.notes:
        err.print(f"note: {note}", markup=False)
    plan = prepared.plan
    if plan_file is not None:
        if dry_run:
            fail("--plan applies a saved plan; it makes no sense with --dry-run")
        plan = _load_saved_plan(plan_file, spec, prepared)
    if dry_run or as_json:
        _show(prepared, plan, as_json)
        if out_file is not None:
            try:
                atomic_write(out_file, plan.dumps())
            except OSError as exc:
                fail(f"--out {out_file}: cannot write: {exc.strerror}")
            err.print(f"plan saved to {out_file}", markup=False)
        if dry_run:
            raise typer.Exit(0 if plan.in_sync else 2)
    else:
        _show(prepared, plan, False)
    if plan.empty:
        return
    if not yes:
        if not sys.stdin.isatty():
            fail("not applying without confirmation: run in a terminal or pass --yes")
        if not typer.confirm("Apply this plan?", default=False):
            fail("not applied")
    progress = CopyProgress()
    executor = session.executor(prepared, on_event=_print_event, on_progress=progress)
    try:
        with progress:
            result = executor.apply(plan)
    except (LockHeld, LockUnavailable) as exc:
        fail(str(exc))
    except OSError as exc:  # the state directory: a file, not writable, a full disk
        fail(f"state directory {session.state_dir}: {exc.strerror or exc}")
    if not result.ok:
        err.print(result.summary(), markup=False)
        fail("apply stopped at the first failure; run `homelab reconcile --dry-run` to see what is left")
    out.print(f"Apply complete: {len(plan.steps)} steps.", markup=False)
    try:
        session.calibrate()  # what the new containers really hold: the next plan reserves it
    except DriverError as exc:
        err.print(f"warning: not measured after the apply: {exc}", markup=False)


def _show(prepared: Prepared, plan: Plan, as_json: bool) -> None:
    if as_json:
        data = plan.to_json()
        data["placement"] = prepared.placement.to_json()
        if prepared.gpus is not None:
            data["gpus"] = prepared.gpus.to_json()
        if prepared.calibration or prepared.calibration_warnings:
            data["calibration"] = {
                "measured": list(prepared.calibration),
                "warnings": list(prepared.calibration_warnings),
            }
        if prepared.notes:
            data["notes"] = list(prepared.notes)
        out.print(json.dumps(data, indent=2, sort_keys=True), markup=False)
        return
    for line in placement_summary(prepared):
        out.print(line, markup=False)
    out.print("", markup=False)
    out.print(render_text(plan), markup=False, end="")


def _load_saved_plan(path: Path, spec: ClusterSpec, prepared: Prepared) -> Plan:
    try:
        plan = Plan.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        fail(f"{path}: no such file")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"{path}: not a readable homelab plan ({exc})")
    if plan.cluster != spec.cluster.name:
        fail(f"{path}: the plan is for cluster '{plan.cluster}', the spec is '{spec.cluster.name}'")
    if plan.observed_fingerprint != prepared.observed.fingerprint():
        fail(f"{path}: the cluster changed since this plan was made; make a new one with --dry-run --out")
    return plan


def _print_event(record: dict[str, Any]) -> None:
    event = record["event"]
    if event == "step-started":
        out.print(f"{record['node']}: {record['step']} {record['name']} ...", markup=False)
    elif event == "step-failed":
        err.print(f"{record['node']}: {record['step']} {record['name']} FAILED: {record['error']}", markup=False)


class CopyProgress:
    """Model copies as progress bars with bytes on a terminal; a line every 10% elsewhere (logs, CI)."""

    def __init__(self) -> None:
        self.bars: Progress | None = None
        if out.is_terminal:
            self.bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                console=out,
            )
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._last: dict[tuple[str, str], int] = {}

    def __enter__(self) -> CopyProgress:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def __call__(self, node: str, name: str, done: int, total: int) -> None:
        key = (node, name)
        if self.bars is not None:
            if key not in self._tasks:
                self._tasks[key] = self.bars.add_task(f"{node}: {name}", total=total)
            self.bars.update(self._tasks[key], completed=done, total=total)
            return
        pct = 100 * done // total if total else 100
        if self._last.get(key) != pct // 10:
            self._last[key] = pct // 10
            what = name if name.startswith("pulling ") else f"copying {name}"
            out.print(f"{node}: {what}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB ({pct}%)", markup=False)
