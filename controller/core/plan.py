"""Changes → an ordered, inert, serialisable plan; and its terraform-style text.

Ordering rules (DESIGN.md, "Rules that keep it safe"), per node:
1. removals first — replaced and deleted containers stop before anything starts,
   so a GPU never holds two models' worth of memory it has room for only once;
2. volumes, then model files (copied and verified) before any container uses them;
3. containers start one at a time, each followed by a wait for its /health,
   GPU containers first, in GPU order (parallel starts deadlock CUDA initialisation).
Ollama on a node: homelab's stale derived models (and, with `prune: true`, tags
no model needs) go with the removals; base tags are pulled and derived models
created after the model files; preloads (which load onto the GPU) come last, one
at a time, after the containers are healthy.
Nodes are independent: the executor runs their step lists in parallel.
The gateway comes last, after every node's steps: write the config, restart the
proxy (when homelab runs it), wait for /health/liveliness.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from controller.core.diff import ADOPT, GATEWAY_NODE, GLYPH, Action, Change, DiffResult
from controller.core.state import (
    ContainerState,
    FileState,
    GatewayState,
    OllamaModelState,
    VolumeState,
    container_from_json,
    container_to_json,
    gateway_from_json,
    gateway_to_json,
    ollama_model_from_json,
    ollama_model_to_json,
)

PLAN_FORMAT = 1


class StepKind(StrEnum):
    REMOVE_CONTAINER = "remove-container"
    ADOPT_CONTAINER = "adopt-container"
    """Stop a container started by hand that a managed one replaces (`adopt:`) and keep it, renamed
    `NAME-adopted-by-homelab` with restart policy `no` (`DockerNode.set_aside`)."""
    REMOVE_FILE = "remove-file"
    REMOVE_SERVICE = "remove-service"
    CREATE_VOLUME = "create-volume"
    COPY_FILE = "copy-file"
    RUN_CONTAINER = "run-container"
    START_CONTAINER = "start-container"
    WAIT_HEALTHY = "wait-healthy"
    OLLAMA_DELETE = "ollama-delete"
    OLLAMA_PULL = "ollama-pull"
    OLLAMA_CREATE = "ollama-create"
    OLLAMA_PRELOAD = "ollama-preload"
    GATEWAY_WRITE = "gateway-write"
    GATEWAY_RESTART = "gateway-restart"
    GATEWAY_WAIT = "gateway-wait"


GATEWAY_STEPS = frozenset({StepKind.GATEWAY_WRITE, StepKind.GATEWAY_RESTART, StepKind.GATEWAY_WAIT})
"""Steps of the final phase: they run after every node's steps have succeeded."""


@dataclass(frozen=True)
class Step:
    node: str
    kind: StepKind
    name: str
    container: ContainerState | None = None
    file: FileState | None = None
    volume: VolumeState | None = None
    ollama_model: OllamaModelState | None = None
    gateway: GatewayState | None = None

    def describe(self) -> str:
        return f"{self.kind.value} {self.name}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "kind": self.kind.value, "name": self.name}
        if self.container is not None:
            out["container"] = container_to_json(self.container)
        if self.file is not None:
            f = self.file
            out["file"] = {"volume": f.volume, "name": f.name, "size": f.size, "sha256": f.sha256, "source": f.source}
        if self.volume is not None:
            out["volume"] = {"name": self.volume.name}
        if self.ollama_model is not None:
            out["ollama_model"] = ollama_model_to_json(self.ollama_model)
        if self.gateway is not None:
            out["gateway"] = gateway_to_json(self.gateway)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Step:
        node = data["node"]
        f = data.get("file")
        v = data.get("volume")
        c = data.get("container")
        om = data.get("ollama_model")
        gw = data.get("gateway")
        return cls(
            node=node,
            kind=StepKind(data["kind"]),
            name=data["name"],
            container=container_from_json(c) if c is not None else None,
            file=FileState(node, f["volume"], f["name"], f.get("size"), f.get("sha256"), f.get("source"))
            if f is not None
            else None,
            volume=VolumeState(node, v["name"]) if v is not None else None,
            ollama_model=ollama_model_from_json(om) if om is not None else None,
            gateway=gateway_from_json(gw) if gw is not None else None,
        )


@dataclass(frozen=True)
class PlannedChange:
    """What the plan text shows for one change (kept in saved plans)."""

    action: Action
    kind: str
    node: str
    name: str
    reason: str
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        out = {
            "action": self.action.value,
            "kind": self.kind,
            "node": self.node,
            "name": self.name,
            "reason": self.reason,
        }
        if self.detail:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_json(cls, c: Mapping[str, Any]) -> PlannedChange:
        return cls(Action(c["action"]), c["kind"], c["node"], c["name"], c["reason"], c.get("detail", ""))


@dataclass(frozen=True)
class Plan:
    cluster: str
    observed_fingerprint: str
    """The observed state the plan was made from: applying a saved plan re-checks it."""
    changes: tuple[PlannedChange, ...]
    steps: tuple[Step, ...]
    unreachable: Mapping[str, str] = field(default_factory=dict)
    deferred: tuple[PlannedChange, ...] = ()
    """What unreachable nodes would need if empty: shown, not planned."""

    @property
    def empty(self) -> bool:
        return not self.steps

    @property
    def in_sync(self) -> bool:
        """Nothing to do and every node with something to run was observed."""
        return not self.steps and not self.unreachable

    def counts(self) -> tuple[int, int, int]:
        """(to add, to change, to destroy) as terraform counts them: a replace is one add and one destroy."""
        add = sum(1 for c in self.changes if c.action in (Action.CREATE, Action.REPLACE))
        change = sum(1 for c in self.changes if c.action is Action.UPDATE)
        destroy = sum(1 for c in self.changes if c.action in (Action.DELETE, Action.REPLACE))
        return add, change, destroy

    def steps_by_node(self) -> dict[str, list[Step]]:
        """Each node's steps, in order; the gateway's (the final phase) are not among them."""
        out: dict[str, list[Step]] = {}
        for s in self.steps:
            if s.kind not in GATEWAY_STEPS:
                out.setdefault(s.node, []).append(s)
        return out

    def gateway_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind in GATEWAY_STEPS]

    def to_json(self) -> dict[str, Any]:
        add, change, destroy = self.counts()
        return {
            "format": PLAN_FORMAT,
            "cluster": self.cluster,
            "observed_fingerprint": self.observed_fingerprint,
            "summary": {"add": add, "change": change, "destroy": destroy},
            "unreachable": dict(self.unreachable),
            "changes": [c.to_json() for c in self.changes],
            "deferred": [c.to_json() for c in self.deferred],
            "steps": [s.to_json() for s in self.steps],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a homelab plan (format {data.get('format')!r}, expected {PLAN_FORMAT})")
        return cls(
            cluster=data["cluster"],
            observed_fingerprint=data["observed_fingerprint"],
            changes=tuple(PlannedChange.from_json(c) for c in data["changes"]),
            steps=tuple(Step.from_json(s) for s in data["steps"]),
            unreachable=dict(data.get("unreachable", {})),
            deferred=tuple(PlannedChange.from_json(c) for c in data.get("deferred", [])),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"


_KIND_ORDER = {
    "adopt": -1,
    "volume": 0,
    "file": 1,
    "container": 2,
    "ollama-tag": 3,
    "ollama-model": 4,
    "service": 5,
    "gateway": 6,
}


def make_plan(cluster: str, result: DiffResult, observed_fingerprint: str) -> Plan:
    """Order the changes into steps, node by node (see the module docstring)."""
    steps: list[Step] = []
    by_node: dict[str, list[Change]] = {}
    for ch in result.changes:
        by_node.setdefault(ch.node, []).append(ch)
    for node in sorted(n for n in by_node if n != GATEWAY_NODE):
        steps.extend(_node_steps(node, by_node[node]))
    steps.extend(_gateway_steps(by_node.get(GATEWAY_NODE, [])))
    return Plan(
        cluster,
        observed_fingerprint,
        _planned(result.changes),
        tuple(steps),
        dict(result.unreachable),
        _planned(result.deferred),
    )


def _planned(changes: tuple[Change, ...]) -> tuple[PlannedChange, ...]:
    return tuple(
        PlannedChange(c.action, c.kind, c.node, c.name, c.reason, c.detail)
        for c in sorted(changes, key=lambda c: (c.node == GATEWAY_NODE, c.node, _KIND_ORDER[c.kind], c.name))
    )


def _gpu_order(c: ContainerState) -> tuple[int, tuple[int, ...], str]:
    gpus = c.config.gpus if c.config is not None else ()
    return (0 if gpus else 1, gpus, c.name)


def _node_steps(node: str, changes: list[Change]) -> list[Step]:
    steps: list[Step] = []
    # 1. Stop and remove what goes away or is replaced: frees VRAM before anything starts.
    for ch in sorted(changes, key=lambda c: c.name):
        if ch.kind == "container" and ch.action in (Action.DELETE, Action.REPLACE):
            before = ch.before if isinstance(ch.before, ContainerState) else None
            steps.append(Step(node, StepKind.REMOVE_CONTAINER, ch.name, container=before))
    # A gateway container where the spec no longer runs it (before the gateway starts anywhere else).
    for ch in sorted(changes, key=lambda c: c.name):
        if ch.kind == "service" and ch.action is Action.DELETE:
            steps.append(Step(node, StepKind.REMOVE_SERVICE, ch.name))
    # Model files no model in the spec uses any more (after the containers that read them).
    for ch in sorted(changes, key=lambda c: c.name):
        if ch.kind == "file" and ch.action is Action.DELETE and isinstance(ch.before, FileState):
            steps.append(Step(node, StepKind.REMOVE_FILE, ch.name, file=ch.before))
    # Homelab's stale derived models, then (prune: true only) tags nothing needs.
    for kind in ("ollama-model", "ollama-tag"):
        for ch in sorted(changes, key=lambda c: c.name):
            if ch.kind == kind and ch.action is Action.DELETE:
                steps.append(Step(node, StepKind.OLLAMA_DELETE, ch.name))
    # 2. Volumes, then files (copied and verified) before the containers that read them.
    for ch in sorted(changes, key=lambda c: c.name):
        if ch.kind == "volume" and isinstance(ch.after, VolumeState):
            steps.append(Step(node, StepKind.CREATE_VOLUME, ch.name, volume=ch.after))
    for ch in sorted(changes, key=lambda c: c.name):
        if ch.kind == "file" and isinstance(ch.after, FileState):
            steps.append(Step(node, StepKind.COPY_FILE, ch.name, file=ch.after))
    # Ollama: pull base tags (a failed pull stops the plan before any model is made from it), then create.
    for ch in sorted(changes, key=lambda c: c.name):
        if ch.kind == "ollama-tag" and ch.action is Action.CREATE:
            steps.append(Step(node, StepKind.OLLAMA_PULL, ch.name))
    preloads: list[Step] = []
    for ch in sorted(changes, key=lambda c: c.name):
        if ch.kind == "ollama-model" and isinstance(ch.after, OllamaModelState):
            if ch.action in (Action.CREATE, Action.REPLACE):
                steps.append(Step(node, StepKind.OLLAMA_CREATE, ch.name, ollama_model=ch.after))
            if ch.after.preload:
                preloads.append(Step(node, StepKind.OLLAMA_PRELOAD, ch.name, ollama_model=ch.after))
    # 3. Containers started by hand that managed ones replace (`adopt:`) are stopped only now, after the files
    #    their replacements read are copied (a long copy, or one that fails, leaves them serving), and before any
    #    container starts (they hold VRAM).
    for ch in sorted(changes, key=lambda c: c.name):
        if ch.kind == ADOPT:
            steps.append(Step(node, StepKind.ADOPT_CONTAINER, ch.name))
    # 4. Containers one at a time, each health-gated; GPU ones first, in GPU order.
    starts = [
        ch
        for ch in changes
        if ch.kind == "container" and ch.action is not Action.DELETE and isinstance(ch.after, ContainerState)
    ]
    for ch in sorted(starts, key=lambda c: _gpu_order(c.after) if isinstance(c.after, ContainerState) else (2, (), "")):
        assert isinstance(ch.after, ContainerState)
        kind = StepKind.START_CONTAINER if ch.action is Action.UPDATE else StepKind.RUN_CONTAINER
        steps.append(Step(node, kind, ch.name, container=ch.after))
        steps.append(Step(node, StepKind.WAIT_HEALTHY, ch.name, container=ch.after))
    # 5. Ollama preloads load onto the GPU: one at a time, after the containers are healthy.
    return steps + preloads


def _gateway_steps(changes: list[Change]) -> list[Step]:
    steps: list[Step] = []
    for ch in changes:
        if not isinstance(ch.after, GatewayState):
            continue
        gw = ch.after
        if ch.before is None or not isinstance(ch.before, GatewayState) or ch.before.text != gw.text:
            steps.append(Step(GATEWAY_NODE, StepKind.GATEWAY_WRITE, ch.name, gateway=gw))
        if gw.mode != "external":
            steps.append(Step(GATEWAY_NODE, StepKind.GATEWAY_RESTART, ch.name, gateway=gw))
        steps.append(Step(GATEWAY_NODE, StepKind.GATEWAY_WAIT, ch.name, gateway=gw))
    return steps


def render_text(plan: Plan) -> str:
    """The plan as a person reads it: `+ ~ - -/+` with reasons, then the totals line."""
    lines: list[str] = []
    for node, err in sorted(plan.unreachable.items()):
        lines.append(f"node {node}: UNREACHABLE ({err})")
        deferred = [c for c in plan.deferred if c.node == node]
        if not deferred:
            lines.append("  nothing is planned here until it answers")
            continue
        lines.append("  nothing is planned here; if the node turns out empty, the next run will:")
        for c in deferred:
            lines.append(f"  {GLYPH[c.action]:>3} {c.kind} {c.name}  ({c.reason})")
    current = None
    for c in plan.changes:
        if c.node != current:
            current = c.node
            lines.append(f"node {c.node}:" if c.node != GATEWAY_NODE else "gateway:")
        if c.kind == ADOPT:
            lines.append(f"  {GLYPH[c.action]:>3} adopt container {c.name} → {c.reason}")
        else:
            lines.append(f"  {GLYPH[c.action]:>3} {c.kind} {c.name}  ({c.reason})")
        lines.extend(f"        {line}" for line in c.detail.splitlines())
    if not plan.changes and not plan.unreachable:
        lines.append("No changes. The cluster matches the spec.")
    elif not plan.changes:
        lines.append("No changes on the nodes that answered.")
    add, change, destroy = plan.counts()
    lines.append(f"Plan: {add} to add, {change} to change, {destroy} to destroy.")
    return "\n".join(lines) + "\n"
