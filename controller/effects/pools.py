"""Which members of each swap pool are loaded now, and since when (for `homelab status`).

A pool's router (llama-server in router mode) says each member's state on `GET /v1/models`
(`controller.drivers.llamacpp`); it starts one child llama-server per member it loads, so the
child's age, which `docker top` reads on the node, is how long that member has been loaded (or,
once its `ttl` has passed, has been asleep: the child is kept while asleep).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.core.state import LABEL_POOL, ClusterState, ContainerState
from controller.drivers.base import DockerNode, DriverError
from controller.drivers.llamacpp import LOADED, SLEEPING, router_models
from specs.model import ClusterSpec, Node


@dataclass(frozen=True)
class MemberNow:
    model: str
    alias: str
    state: str
    """loaded, loading, sleeping, unloaded, failed; `unknown` when the router did not answer."""
    since: float | None = None
    """Epoch seconds its process started (loaded or asleep), when the node's `docker top` said."""

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "alias": self.alias, "state": self.state, "since": self.since}


@dataclass(frozen=True)
class PoolNow:
    node: str
    container: str
    key: str
    max_loaded: int | None
    members: tuple[MemberNow, ...]
    error: str | None = None
    """Why the members' states are unknown (the router did not answer)."""

    @property
    def loaded(self) -> tuple[MemberNow, ...]:
        return tuple(m for m in self.members if m.state == LOADED)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "container": self.container,
            "pool": self.key,
            "max_loaded": self.max_loaded,
            "members": [m.to_json() for m in self.members],
            "error": self.error,
        }


def max_loaded_of(c: ContainerState) -> int | None:
    """The router's `--models-max`, from its command line."""
    command = list(c.config.command) if c.config is not None else []
    if "--models-max" in command[:-1]:
        try:
            return int(command[command.index("--models-max") + 1])
        except ValueError:
            return None
    return None


def pool_now(
    c: ContainerState, states: Mapping[str, str] | None, ages: Mapping[str, float], now: float, error: str | None
) -> PoolNow:
    """Pure: a pool's members from the router's states (alias → state; None: no answer) and process ages."""
    assert c.config is not None
    members = []
    for m in c.config.members:
        state = "unknown" if states is None else states.get(m.alias, "unknown")
        age = ages.get(m.alias)
        since = now - age if age is not None and state in (LOADED, SLEEPING) else None
        members.append(MemberNow(m.model, m.alias, state, since))
    return PoolNow(c.node, c.name, c.labels.get(LABEL_POOL, ""), max_loaded_of(c), tuple(members), error)


def observe_pools(
    spec: ClusterSpec,
    observed: ClusterState,
    connect: Callable[[Node], DockerNode],
    *,
    timeout: float = 2.0,
    clock: Callable[[], float] = time.time,
) -> dict[tuple[str, str], PoolNow]:
    """(node, container) → its pool now, for every running swap pool's container."""
    out: dict[tuple[str, str], PoolNow] = {}
    for node in spec.nodes:
        state = observed.nodes.get(node.name)
        if state is None or not state.reachable:
            continue
        for c in state.containers:
            if not c.pool or c.status != "running":
                continue
            states: dict[str, str] | None
            error = None
            try:
                answer = router_models(c.health_url.removesuffix("/health"), timeout)
                states = {alias: m.state for alias, m in answer.items()}
            except DriverError as exc:
                states, error = None, str(exc)
            try:
                ages = connect(node).pool_processes(c.name)
            except DriverError:
                ages = {}
            out[node.name, c.name] = pool_now(c, states, ages, clock(), error)
    return out
