"""`homelab status`: what runs where, per node and GPU, as observed now, with planned vs actual VRAM, and what a
running `homelab watch` last did."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from controller.commands.common import SpecFileOption, err, load_or_exit, out, spec_path, wiring_of
from controller.core.state import OllamaNodeState
from controller.effects import calibration
from controller.effects.engine import Session, state_dir
from controller.effects.hostcpu import host_cpus
from controller.effects.pools import PoolNow, observe_pools
from controller.effects.power import PowerStore
from controller.effects.status_api import nodes_json
from controller.effects.vram_status import describe, planned_vs_actual
from controller.effects.watch import describe_watch, read_status
from solver.gguf import read_header
from solver.profiles import profiles_for


def register(app: typer.Typer) -> None:
    @app.command()
    def status(
        ctx: typer.Context,
        file: SpecFileOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    ) -> None:
        """What runs where: managed containers per node and GPU, and Ollama models, as observed now, with
        planned vs actual VRAM."""
        spec = load_or_exit(spec_path(file)).spec
        state = state_dir(spec, None)
        watching = read_status(state)  # what a running `homelab watch` last did, if any
        asleep = PowerStore.of(spec, state).load()  # nodes homelab put to sleep: ASLEEP, not failed
        with Session(spec, wiring_of(ctx)) as session:
            found = session.resolve()  # observed, and placed as `reconcile` places: the VRAM it plans
            observed, reality = found.observed, found.gpus
            assert observed is not None and reality is not None
            cpus = host_cpus(spec, session.wiring.host_cpu)
            vram = planned_vs_actual(spec, observed, session.connect, reality, found.placement)
            # What each container really holds now, estimate vs measured per container (shown, not kept: a
            # status writes nothing; reconcile and the watch keep the measurements).
            measured = calibration.merge(
                calibration.read(state), calibration.measure(spec, observed, session.connect, reality), observed
            )
            pools = observe_pools(spec, observed, session.connect)
        calibrated = calibration.estimate_vs_measured(
            spec, observed, measured, profiles_for(spec, read_header=read_header, cpus=cpus)
        )
        for warning in reality.warnings:
            err.print(f"warning: {warning}", markup=False)
        if as_json:
            data: dict[str, Any] = {"cluster": spec.cluster.name, "nodes": nodes_json(observed, vram, calibrated)}
            if watching is not None:
                data["watch"] = watching
            data["asleep"] = asleep
            if pools:
                data["pools"] = [p.to_json() for p in pools.values()]
            out.print(json.dumps(data, indent=2), markup=False)
            return
        if watching is not None:
            for line in describe_watch(watching):
                out.print(line, markup=False)
        for name, node in observed.nodes.items():
            for line in _ollama_lines(node.ollama):
                out.print(f"{name}: {line}" if not line.startswith(" ") else line, markup=False)
            if spec.node(name).docker is None:
                continue
            if name in asleep:
                record = asleep[name]
                since = time.strftime("%H:%M:%S", time.localtime(float(record.get("since") or 0)))
                word = "WAKING" if record.get("state") == "waking" else "ASLEEP"
                out.print(f"{name}: {word} since {since} (homelab put it to sleep: {record.get('reason')})",
                          markup=False)  # fmt: skip
                if not node.reachable:
                    continue
            if not node.reachable:
                out.print(f"{name}: NOT OBSERVED ({node.error})", markup=False)
                continue
            out.print(f"{name}: {len(node.containers)} managed, {len(node.foreign_containers)} other", markup=False)
            for c in node.containers:
                cfg = c.config
                where = f"GPU {','.join(map(str, cfg.gpus))}" if cfg and cfg.gpus else "CPU"
                detail = f"port {cfg.port}, ngl {cfg.gpu_layers}, ctx {cfg.context}" if cfg else "no config label"
                if cfg is not None and cfg.pool:
                    detail = f"port {cfg.port}, {len(cfg.members)} on-demand models"
                v = vram.get((name, c.name))
                usage = f"  {describe(v)}" if v is not None and (v.planned_bytes or v.actual_bytes) else ""
                out.print(f"  {c.name}  {c.status}  {where}  {detail}{usage}", markup=False)
                got = calibrated.get((name, c.name))
                for line in got.lines() if got is not None else []:
                    out.print(f"    {line}", markup=False)
                pool = pools.get((name, c.name))
                for line in pool_lines(pool, time.time()) if pool is not None else []:
                    out.print(f"    {line}", markup=False)


def pool_lines(pool: PoolNow, now: float) -> list[str]:
    """`swap pool: 1 of 3 loaded (max 1)` and one line per member: `chat-a  loaded since 18:40:12 UTC (3m ago)`."""
    if pool.error is not None:
        head = f"swap pool: members unknown ({pool.error})"
    else:
        most = f" (max {pool.max_loaded})" if pool.max_loaded is not None else ""
        head = f"swap pool: {len(pool.loaded)} of {len(pool.members)} loaded{most}"
    lines = [head]
    for m in pool.members:
        text = f"  {m.model}  {m.state}"
        if m.since is not None:
            stamp = datetime.fromtimestamp(m.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            text += f" since {stamp} ({_ago(now - m.since)})"
        lines.append(text)
    return lines


def _ago(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s ago"
    return f"{s // 3600}h{s % 3600 // 60:02d}m ago"


def _ollama_lines(o: OllamaNodeState | None) -> list[str]:
    """A node's Ollama server: homelab's derived models (parameters, loaded or not) and the other tags."""
    if o is None:
        return []
    if not o.reachable:
        return [f"Ollama {o.url}: NOT OBSERVED ({o.error})"]
    lines = [f"Ollama {o.url}: {len(o.models)} homelab models, {len(o.tags)} other tags"]
    for m in o.models:
        params = f"num_gpu {m.num_gpu if m.num_gpu is not None else 'default'}, num_ctx {m.num_ctx or 'default'}"
        lines.append(f"  {m.name}  from {m.base or '?'}  {params}  {'loaded' if m.preload else 'not loaded'}")
    return lines
