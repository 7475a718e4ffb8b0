"""The status page's data: the state directory and the cluster as they are now, in one plain dict.

`collect()` does the I/O — observe every node through its Docker engine and Ollama server (as
`homelab status`), ask nvidia-smi where the spec has GPUs it can see, place and render as a reconcile
does (`Session.resolve`; planned vs actual VRAM: `controller.effects.vram_status.planned_vs_actual`), probe
every endpoint (`controller.effects.health.check`), read STATE_DIR/watch.json and the tail of
STATE_DIR/events.jsonl — and `build()` turns what it found into the dict `controller.core.status_page`
renders and `/api/status` serves (its keys are listed there).
The `nodes` part is exactly `homelab status --json`'s (`nodes_json`, which that command uses too).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.core.desired import container_name
from controller.core.routing import (
    Endpoint,
    EndpointHealth,
    RouteError,
    candidates,
    category_models,
    choose,
    endpoints_from_state,
    fallback_chain,
)
from controller.core.state import ClusterState, OllamaNodeState, pool_container_name
from controller.drivers.base import DriverError
from controller.effects.apply import EVENTS_FILE
from controller.effects.calibration import ContainerCalibration
from controller.effects.engine import Session, Wiring
from controller.effects.gpu_use import GpuReality, ModelVram, match_gpu
from controller.effects.health import ANSWERING, HealthReport, Probe, mark_asleep, tier_verdict
from controller.effects.pools import PoolNow, observe_pools
from controller.effects.power import ASLEEP, AWAKE, WAKING, PowerStore
from controller.effects.route_probe import Probed, endpoint_health
from controller.effects.statefile import TIME, good_line
from controller.effects.vram_status import StatusKey, planned_vs_actual
from controller.effects.watch import read_status
from solver.problem import PlacementResult, Pool
from specs.enums import Category, Runtime
from specs.model import ClusterSpec, Node

EVENTS_KEPT = 30
EVENTS_TAIL_BYTES = 64 * 1024


# --------------------------------------------------------------------------- `homelab status --json`


def ollama_json(o: OllamaNodeState | None) -> dict[str, Any] | None:
    if o is None:
        return None
    return {
        "url": o.url,
        "reachable": o.reachable,
        "error": o.error,
        "models": [
            {"name": m.name, "base": m.base, "num_gpu": m.num_gpu, "num_ctx": m.num_ctx, "loaded": m.preload}
            for m in o.models
        ],
        "other_tags": list(o.tags),
    }


def vram_json(v: ModelVram | None) -> dict[str, Any]:
    return {
        "vram_planned_bytes": v.planned_bytes if v is not None else None,
        "vram_actual_bytes": v.actual_bytes if v is not None else None,
        "vram_over_plan": v.over_plan if v is not None else False,
    }


def nodes_json(
    observed: ClusterState,
    vram: Mapping[StatusKey, ModelVram],
    calibrated: Mapping[StatusKey, ContainerCalibration] | None = None,
) -> dict[str, dict[str, Any]]:
    """The nodes as `homelab status --json` prints them (a measured container also has its estimate, measured
    figures and their difference: `calibrated`, from `calibration.estimate_vs_measured`)."""
    calibrated = calibrated or {}
    out: dict[str, dict[str, Any]] = {}
    for name, node in observed.nodes.items():
        out[name] = {
            "reachable": node.reachable,
            "error": node.error,
            "containers": [
                {
                    "name": c.name,
                    "model": c.model,
                    "status": c.status,
                    "gpus": list(c.config.gpus) if c.config else [],
                    "port": c.config.port if c.config else None,
                    "gpu_layers": c.config.gpu_layers if c.config else None,
                    **vram_json(vram.get((name, c.name))),
                    **_calibration_json(calibrated.get((name, c.name))),
                }
                for c in node.containers
            ],
            "foreign_containers": list(node.foreign_containers),
            "ollama": ollama_json(node.ollama),
        }
    return out


def _calibration_json(c: ContainerCalibration | None) -> dict[str, Any]:
    return {"measured": c.to_json()} if c is not None else {}


# --------------------------------------------------------------------------- the state directory


def read_events(state_dir: Path, keep: int = EVENTS_KEPT) -> list[dict[str, Any]]:
    """The last `keep` events of STATE_DIR/events.jsonl (only its tail is read; a torn line is skipped)."""
    path = state_dir / EVENTS_FILE
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            end = fh.tell()
            fh.seek(max(0, end - EVENTS_TAIL_BYTES))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    out: list[dict[str, Any]] = []
    for line in tail.splitlines()[-keep:]:
        record = good_line(line, EVENT_SHAPE)  # a torn, corrupt or odd line is skipped
        if record is not None:
            out.append(record)
    return out


EVENT_SHAPE: dict[str, Any] = {"time": TIME, "event": str, "node": str, "step": str, "name": str}
"""An events.jsonl line as the status page and /api/status need it (`statefile.check`)."""


# --------------------------------------------------------------------------- what was found → the dict


@dataclass(frozen=True)
class Found:
    """Everything `collect` learnt from the cluster in one pass."""

    observed: ClusterState
    vram: Mapping[StatusKey, ModelVram]
    reality: GpuReality
    placement: PlacementResult
    desired: ClusterState | None
    report: HealthReport | None
    warnings: tuple[str, ...] = ()
    pools: Mapping[tuple[str, str], PoolNow] = field(default_factory=dict)
    """(node, container) → the swap pool's members now (`observe_pools`)."""
    power: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """The nodes homelab put to sleep: STATE_DIR/power.json ({node: {state, since, reason}})."""


def _node_state(name: str, node: Mapping[str, Any], probes: Sequence[Probe], report: bool) -> tuple[str, list[str]]:
    """HEALTHY / DEGRADED / DOWN from the node's own endpoints (as its tier is judged), and why."""
    reasons: list[str] = []
    if not node.get("reachable", True):
        reasons.append(f"Docker engine not observed: {node.get('error')}")
    ollama = node.get("ollama")
    if isinstance(ollama, Mapping) and not ollama.get("reachable"):
        reasons.append(f"Ollama not observed: {ollama.get('error')}")
    for c in node.get("containers") or []:
        if c.get("status") != "running":
            reasons.append(f"{c.get('name')}: {c.get('status')}")
    for p in probes:
        if p.status not in ANSWERING:
            reasons.append(f"{p.endpoint.name}: {p.error or p.status.value}")
    if not report:
        return ("NOT OBSERVED" if reasons else "UNKNOWN"), reasons
    return tier_verdict(probes).value, reasons


def _health_view(report: HealthReport | None) -> Callable[[Endpoint], EndpointHealth | None]:
    probed = {p.endpoint.target: Probed.of(p) for p in report.probes} if report is not None else {}

    def view(ep: Endpoint) -> EndpointHealth | None:
        answer = probed.get(ep.health_url)
        return endpoint_health(ep, answer) if answer is not None else None

    return view


def routing_json(spec: ClusterSpec, desired: ClusterState | None, report: HealthReport | None) -> list[dict[str, Any]]:
    """Per category: its preferred models and fallbacks, each up / down / not placed, and who answers now."""
    eps = endpoints_from_state(spec, desired) if desired is not None else {}
    view = _health_view(report)
    out: list[dict[str, Any]] = []
    for cat in Category:
        if not candidates(spec, cat):
            continue
        chain = []
        for link in fallback_chain(spec, cat):
            models = []
            for model in category_models(spec, link):
                replicas = eps.get(model, ())
                if not replicas:
                    models.append({"model": model, "state": "not-placed", "why": "not placed"})
                    continue
                states = [view(r) for r in replicas]
                up = any(s is None or s.healthy for s in states)
                why = "; ".join(
                    f"{r.node}: {s.reason}" for r, s in zip(replicas, states, strict=True) if s and not s.healthy
                )
                models.append({"model": model, "state": "up" if up else "down", "why": why or "answers"})
            chain.append({"category": link.value, "models": models})
        answer: dict[str, Any] | None = None
        try:
            chosen = choose(spec, cat, eps, view)
        except RouteError as exc:
            reason = str(exc)
        else:
            reason = chosen.reason
            answer = {
                "model": chosen.model,
                "node": chosen.endpoint.node,
                "category": chosen.category.value,
                "fallback_used": chosen.fallback_used,
            }
        out.append({"category": cat.value, "chain": chain, "answer": answer, "reason": reason})
    return out


def _gpus_json(spec_node: Node, found: Found, vram_status: Mapping[str, Any]) -> list[dict[str, Any]]:
    placement, reality = found.placement, found.reality
    containers = {c["name"] for c in vram_status.get("containers") or []}
    uses = {(g.node, g.index): g for g in placement.gpus}
    findings = {(f.node, f.index): f for f in reality.findings}
    report = reality.reports.get(spec_node.name)
    out = []
    for gpu in spec_node.gpus:
        use = uses.get((spec_node.name, gpu.index))
        finding = findings.get((spec_node.name, gpu.index))
        info = match_gpu(report, gpu) if report is not None else None
        models = []
        for a in placement.assignments:
            if a.node != spec_node.name or gpu.index not in a.gpus or a.on_demand:
                continue  # an on-demand model is counted in its swap pool, below
            cname = container_name(a.model)
            v = found.vram.get((spec_node.name, cname)) if cname in containers else None
            models.append(
                {
                    "model": a.model,
                    "replica": a.replica,
                    "container": cname if cname in containers else None,
                    "gpu_layers": a.layers_per_gpu.get(gpu.index, a.gpu_layers),
                    "layers": a.layers,
                    "planned_bytes": a.vram_bytes.get(gpu.index, 0),
                    "actual_bytes": v.actual_bytes if v is not None else None,
                    "over_plan": v.over_plan if v is not None else False,
                }
            )
        out.append(
            {
                "index": gpu.index,
                "name": gpu.name,
                "vram_bytes": gpu.vram,
                "reserve_bytes": gpu.reserve,
                "foreign_bytes": finding.foreign_bytes if finding is not None else 0,
                "shortfall_bytes": finding.shortfall_bytes if finding is not None else 0,
                "capacity_bytes": use.capacity_bytes if use is not None else gpu.vram - gpu.reserve,
                "planned_bytes": use.used_bytes if use is not None else 0,
                "used_bytes": info.used_bytes if info is not None else None,
                "models": models,
                "pools": [
                    pool_json(p, found, containers)
                    for p in placement.pools
                    if p.node == spec_node.name and p.gpu == gpu.index
                ],
            }
        )
    return out


def pool_json(pool: Pool, found: Found, containers: set[str]) -> dict[str, Any]:
    """A swap pool: its size, `max_loaded`, and each member's state now — a llama.cpp pool's from its router
    (`observe_pools`: loaded, loading, sleeping, unloaded, failed; `unknown` when not observed), an Ollama
    pool's from `/api/ps` (loaded or unloaded)."""
    node = pool.node
    cname = pool_container_name(pool.key) if pool.runtime is Runtime.LLAMACPP else None
    running = cname if cname is not None and cname in containers else None
    now = found.pools.get((node, cname)) if cname is not None else None
    error: str | None = None
    states: dict[str, tuple[str, float | None]] = {}
    if now is not None:
        states = {m.model: (m.state, m.since) for m in now.members}
        error = now.error
    elif pool.runtime is Runtime.OLLAMA:
        observed = found.observed.nodes.get(node)
        ollama = observed.ollama if observed is not None else None
        if ollama is not None and ollama.reachable:
            loaded = {m.model for m in ollama.models if m.preload}
            states = {m: ("loaded" if m in loaded else "unloaded", None) for m in pool.members}
        else:
            error = "Ollama not observed"
    else:
        error = "its router is not running" if running is None else "its router was not asked"
    members = [
        {"model": m, "state": states.get(m, ("unknown", None))[0], "since": states.get(m, ("unknown", None))[1]}
        for m in pool.members
    ]
    v = found.vram.get((node, running)) if running is not None else None
    return {
        "pool": pool.key,
        "runtime": pool.runtime.value,
        "container": running,
        "max_loaded": pool.max_loaded,
        "loaded": sum(1 for m in members if m["state"] == "loaded"),
        "members": members,
        "planned_bytes": pool.size_bytes,
        "ram_bytes": pool.ram_bytes,
        "actual_bytes": v.actual_bytes if v is not None else None,
        "over_plan": v.over_plan if v is not None else False,
        "error": error,
    }


def power_json(
    spec_node: Node, record: Mapping[str, Any] | None, watch: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """A node's power state: asleep or waking (STATE_DIR/power.json), else awake; with the spec's `sleep_after`
    and, from a running `homelab watch`'s last sweep (watch.json `power`), how long it had been idle then.
    None for a node with no `power` section that homelab never put to sleep (always on)."""
    if spec_node.power is None and record is None:
        return None
    watched_all = (watch or {}).get("power")
    watched = watched_all.get(spec_node.name) if isinstance(watched_all, Mapping) else None
    watched = watched if isinstance(watched, Mapping) else {}
    updated = (watch or {}).get("updated")
    if record is not None and record.get("state") in (ASLEEP, WAKING):
        state, since, reason = str(record["state"]), record.get("since"), record.get("reason")
    elif watched.get("state") == WAKING:
        state, since, reason = WAKING, watched.get("since"), watched.get("reason")
    else:
        state, since, reason = AWAKE, None, watched.get("reason")
    idle = watched.get("idle_s") if state == AWAKE else None
    number = (int, float)
    last_use = updated - idle if isinstance(idle, number) and isinstance(updated, number) else None
    return {
        "state": state,
        "since": since,
        "reason": reason,
        "sleep_after": spec_node.power.sleep_after if spec_node.power is not None else None,
        "idle_s": idle,
        "last_use": last_use,
        "checked": updated if watched else None,
    }


def build(
    spec: ClusterSpec,
    found: Found,
    *,
    spec_path: str,
    spec_hash: str,
    watch: Mapping[str, Any] | None,
    events: Sequence[Mapping[str, Any]],
    now: float,
) -> dict[str, Any]:
    """The `/api/status` dict (keys in `controller.core.status_page`). No I/O."""
    nodes = nodes_json(found.observed, found.vram)
    probes_by_node: dict[str, list[Probe]] = {}
    if found.report is not None:
        for p in found.report.probes:
            if p.endpoint.node is not None and p.endpoint.tier != "gateway":
                probes_by_node.setdefault(p.endpoint.node, []).append(p)
    runtimes = {m.name: m.runtime.value for m in spec.models}
    for spec_node in spec.nodes:
        n = nodes.setdefault(
            spec_node.name,
            {"reachable": True, "error": None, "containers": [], "foreign_containers": [], "ollama": None},
        )
        by_model = {c["model"]: c for c in n["containers"]}
        n["tier"] = spec_node.tier.value
        n["ram_bytes"] = spec_node.ram
        n["state"], n["reasons"] = _node_state(
            spec_node.name, n, probes_by_node.get(spec_node.name, []), found.report is not None
        )
        n["gpus"] = _gpus_json(spec_node, found, n)
        n["cpu_models"] = [
            {
                "model": a.model,
                "replica": a.replica,
                "runtime": runtimes.get(a.model),
                "ram_bytes": a.ram_bytes,
                "status": (by_model.get(a.model) or {}).get("status"),
            }
            for a in found.placement.assignments
            if a.node == spec_node.name and not a.gpus and not a.on_demand
        ]
        running = {c["name"] for c in n["containers"]}
        n["cpu_pools"] = [
            pool_json(p, found, running) for p in found.placement.pools if p.node == spec_node.name and p.gpu is None
        ]
        n["power"] = power_json(spec_node, found.power.get(spec_node.name), watch)
    order = {n.name: i for i, n in enumerate(spec.nodes)}
    return {
        "cluster": spec.cluster.name,
        "generated": now,
        "spec": {"path": spec_path, "hash": spec_hash},
        "nodes": dict(sorted(nodes.items(), key=lambda kv: order.get(kv[0], len(order)))),
        "health": found.report.to_json() if found.report is not None else None,
        "placement": {
            "status": found.placement.status,
            "unplaced": [u.to_json() for u in found.placement.unplaced],
            "notes": list(found.placement.notes),
        },
        "routing": routing_json(spec, found.desired, found.report),
        "watch": dict(watch) if watch is not None else None,
        "events": list(events),
        "warnings": list(found.warnings),
    }


# --------------------------------------------------------------------------- the I/O


def spec_digest(path: Path) -> str:
    """The spec's hash as `homelab watch` records it (sha256 of the text, 16 hex digits)."""
    try:
        return hashlib.sha256(path.read_text(encoding="utf-8").encode()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def find(spec: ClusterSpec, wiring: Wiring, sdir: Path) -> Found:
    """Observe, place (as a reconcile places: the wiring's solver settings), render and probe: the cluster now,
    with the power state kept in the state directory `sdir`. Never raises for a node that does not answer."""
    warnings: list[str] = []
    names = {n.name for n in spec.nodes}
    with Session(spec, wiring, sdir) as session:
        found = session.resolve()  # as `reconcile` places and renders (one recipe: `controller.core.resolve`)
        observed, reality, placement = found.observed, found.gpus, found.placement
        assert observed is not None and reality is not None
        vram = planned_vs_actual(spec, observed, session.connect, reality, placement)
        pools = observe_pools(spec, observed, session.connect)
    power = PowerStore.of(spec, sdir).load()
    warnings.extend(reality.warnings)
    desired = found.resolved.desired
    if found.resolved.error is not None:
        warnings.append(f"cannot render the desired state: {found.resolved.error}")
    try:
        # a node homelab put to sleep on purpose shows ASLEEP, not DOWN
        report: HealthReport | None = mark_asleep(wiring.health(spec, desired), set(power) & names)
    except (DriverError, OSError) as exc:
        report = None
        warnings.append(f"health not probed: {exc}")
    return Found(observed, vram, reality, placement, desired, report, tuple(warnings), pools, power)


def collect(
    spec: ClusterSpec,
    spec_path: Path,
    state_dir: Path,
    wiring: Wiring,
) -> dict[str, Any]:
    """The `/api/status` dict for `spec`, as the cluster and the state directory are now."""
    found = find(spec, wiring, state_dir)
    return build(
        spec,
        found,
        spec_path=str(spec_path),
        spec_hash=spec_digest(spec_path),
        watch=read_status(state_dir),
        events=read_events(state_dir),
        now=time.time(),
    )
