"""`homelab place`: where every model replica goes, and why the others don't fit.

The lead's `controller/cli.py` calls `register(app)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from controller.commands.common import fail, load_or_exit, out, spec_path, wiring_of
from controller.effects.engine import Session
from controller.effects.hostcpu import host_cpus
from solver.explain import gib
from solver.place import SolveParams
from solver.problem import PlacementResult
from solver.profiles import MemoryProfile, PlannedCpu, Profile


def cpu_dependent(
    result: PlacementResult, profiles: Mapping[str, Profile], cpus: Mapping[str, PlannedCpu]
) -> dict[str, PlannedCpu]:
    """The CPU of each node holding a CPU-only replica whose RAM depends on the CPU (estimated from the model's
    shape: a GGUF header or Ollama's model_info; a declared `memory:` is the same on any CPU)."""
    out: dict[str, PlannedCpu] = {}
    for a in result.assignments:
        profile = profiles.get(a.model)
        if not a.gpus and isinstance(profile, MemoryProfile) and profile.shape is not None and a.node in cpus:
            out[a.node] = cpus[a.node]
    return out


def render(
    result: PlacementResult,
    console: Console,
    measured: Sequence[str] = (),
    cpus: Mapping[str, PlannedCpu] | None = None,
    profiles: Mapping[str, Profile] | None = None,
) -> None:
    """The planning table per GPU, then CPU-only replicas (with the CPU their RAM was estimated for, where it
    matters: `cpus` and `profiles`), the reservations raised by measurements (`measured`), then unplaced replicas
    with their reasons.

    A replica split over several GPUs has a row in each of their tables, with the layers on that GPU.
    A GPU's swap pool (on-demand models) follows its pinned models: the pool's size (its `max_loaded`
    largest members together) and each member's own need while loaded.
    """
    pools = {(p.node, p.gpu): p for p in result.pools}
    for g in result.gpus:
        rows = [a for a in result.assignments if a.node == g.node and g.index in a.gpus and not a.on_demand]
        table = Table(title=f"{g.node} GPU {g.index} ({g.name}, {gib(g.capacity_bytes)} usable)", title_justify="left")
        table.add_column("model")
        table.add_column("GiB", justify="right")
        table.add_column("GPU layers", justify="right")
        for a in rows:
            name = a.model if a.replica == 0 else f"{a.model}#{a.replica}"
            layers = f"{a.gpu_layers}/{a.layers}"
            if a.split:
                # One row per GPU of a split replica: the layers on this GPU, and the GPUs it is split over.
                over = "+".join(str(i) for i in a.gpus)
                layers = f"{a.layers_per_gpu.get(g.index, 0)}/{a.layers} (split {over})"
            table.add_row(name, f"{a.vram_bytes[g.index] / (1 << 30):.1f}", layers)
        pool = pools.get((g.node, g.index))
        if pool is not None:
            members = {
                a.model: a for a in result.assignments if a.on_demand and a.node == g.node and a.gpus == (g.index,)
            }
            table.add_section()
            table.add_row(
                f"swap pool ({pool.runtime.value}, max_loaded {pool.max_loaded})",
                f"{pool.size_bytes / (1 << 30):.1f}",
                "",
            )
            for name in pool.members:
                a = members[name]
                table.add_row(
                    f"  {name} (on-demand)", f"{a.vram_bytes[g.index] / (1 << 30):.1f}", f"{a.gpu_layers}/{a.layers}"
                )
        pct = 100.0 * g.used_bytes / g.capacity_bytes if g.capacity_bytes else 0.0
        table.add_section()
        table.add_row("total", f"{g.used_bytes / (1 << 30):.1f}", f"{pct:.0f}% used")
        table.add_row("remaining", f"{(g.capacity_bytes - g.used_bytes) / (1 << 30):.1f}", "")
        console.print(table)
    cpu = [a for a in result.assignments if not a.gpus and not a.on_demand]
    if cpu:
        console.print("CPU only:", markup=False)
        shown = cpu_dependent(result, profiles or {}, cpus or {})
        for a in cpu:
            profile = (profiles or {}).get(a.model)
            depends = isinstance(profile, MemoryProfile) and profile.shape is not None and a.node in shown
            where = f" ({shown[a.node].describe()})" if depends else ""
            console.print(f"  {a.model} on {a.node}: {gib(a.ram_bytes)} RAM{where}", markup=False)
    cpu_pools = [p for p in result.pools if p.gpu is None]
    if cpu_pools:
        console.print("CPU swap pools:", markup=False)
        for p in cpu_pools:
            console.print(
                f"  {p.node} ({p.runtime.value}, max_loaded {p.max_loaded}): {gib(p.ram_bytes)} RAM"
                f" for {', '.join(p.members)}",
                markup=False,
            )
    if measured:
        console.print("Measured:", markup=False)
        for line in measured:
            console.print(f"  {line}", markup=False)
    if result.notes:
        console.print("Partly offloaded:", markup=False)
        for note in result.notes:
            console.print(f"  {note}", markup=False)
    if result.unplaced:
        console.print("Not placed:", markup=False)
        for u in result.unplaced:
            console.print(f"  {u.reason}", markup=False)
    console.print(f"status: {result.status} ({result.solver})", markup=False)


def register(app: typer.Typer) -> None:
    """Add the `place` command to `app`."""

    def place_cmd(
        ctx: typer.Context,
        file: Annotated[
            Path | None,
            typer.Option("--file", "-f", help="Spec file [default: $HOMELAB_SPEC or ./cluster.yaml]", dir_okay=False),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the placement as JSON.")] = False,
        time_limit: Annotated[float, typer.Option("--time-limit", help="Solver seconds, both stages.")] = 10.0,
        workers: Annotated[int, typer.Option("--workers", help="CP-SAT worker threads (1 is deterministic).")] = 1,
    ) -> None:
        """Place every model replica on a node, a GPU and a number of GPU layers.

        Exit 0 when every replica is placed, 2 when some are not (each with its
        reason), 1 on an error in the spec or the options.
        """
        if time_limit <= 0:
            fail("--time-limit: must be greater than 0")
        if workers < 1:
            fail("--workers: must be at least 1")
        spec = load_or_exit(spec_path(file)).spec
        solve = SolveParams(time_limit=time_limit, workers=workers)
        # The CPU each node's estimates are for: the spec's `cpu:`, this machine's for a node that is this
        # machine, else the kind that needs the most RAM.
        cpus = host_cpus(spec, wiring_of(ctx).host_cpu)
        # Placed as `reconcile` places, without observing: the measurements kept by reconcile and the watch count
        # for configurations the spec has not changed since.
        with Session(spec, replace(wiring_of(ctx), solve=solve)) as session:
            resolved = session.resolve(observe=False).resolved
        result, profiles, measured = resolved.placement, resolved.profiles, resolved.calibration
        if as_json:
            data = result.to_json()
            if measured:
                data["measured"] = list(measured)
            shown = cpu_dependent(result, profiles, cpus)
            if shown:  # nodes whose CPU-only replicas' RAM depends on the CPU
                data["cpus"] = {n: {"kind": c.kind.value, "source": c.source.value} for n, c in shown.items()}
            out.print(json.dumps(data, indent=2), markup=False)
        else:
            render(result, out, measured, cpus, profiles)
        if result.unplaced:
            raise typer.Exit(2)

    app.command(name="place")(place_cmd)
