"""One reconcile, from spec to plan: observe → place → render → diff → plan, and the Session that runs it.

The only I/O here is what the drivers do while observing; everything after is
pure (`controller.core`). Every caller that reconciles — `homelab reconcile`
and its dry run, `homelab watch`, recovery's container restart, `homelab
gateway render` — does it through one `Session`:

    with Session(spec, wiring, state_dir) as session:     # opens nothing yet
        prepared = session.prepare()                      # resolve (observe, place, render), diff, plan
        result = session.executor(prepared, on_event=...).apply(prepared.plan)
        session.calibrate()                               # what the new containers hold, for the next plan
    # every driver the session opened is closed here (Docker clients, SSH tunnels)

Every command that needs "what runs where" — `health`, `route`, `wake`, `recover`, `status` and its page,
`place`, `gateway render` — asks `Session.resolve()`, which calls the one recipe, `controller.core.resolve`.
Planning writes nothing to the state directory.

`Wiring` holds the process-wide seams — how nodes, Ollama servers, the gateway
and GPUs are reached, how a started container is waited for, how health is
probed — and the solver settings, so every caller places the same way. The
CLI takes it from Typer's context object (tests pass their own), the watch
loop and recovery are handed it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from controller.core.diff import DiffResult, PortConflict, diff
from controller.core.plan import Plan, make_plan
from controller.core.resolve import Resolved, resolve
from controller.core.state import ClusterState, GatewayState, url_host
from controller.drivers.base import DockerNode, Gateway, OllamaNode
from controller.drivers.docker import DockerEngine
from controller.drivers.gpu import GpuProbe, discover_gpus
from controller.drivers.litellm import ContainerGateway, LocalGateway
from controller.drivers.ollama import OllamaHttp
from controller.effects import calibration
from controller.effects.apply import Executor, HealthCheck, wait_healthy
from controller.effects.gpu_use import GpuReality, observe_gpus
from controller.effects.health import HealthReport, check
from controller.effects.hostcpu import HostCpu, host_cpus, local_cpu_flags
from controller.effects.observe import keep_sha256s, observe_gateway, ollama_model_info
from controller.effects.observe import observe as observe_nodes
from solver.gguf import read_header
from solver.place import SolveParams
from solver.problem import PlacementResult
from solver.profiles import Profile
from specs.model import ClusterSpec, Node, Watch

DEFAULT_SOLVE = SolveParams(time_limit=10.0, workers=1)
"""The solver settings every reconcile uses (10 deterministic seconds, one worker: the same plan every time)."""


@dataclass(frozen=True)
class Resolution:
    """What runs where (`controller.core.resolve.Resolved`) and what it was worked out from."""

    resolved: Resolved
    observed: ClusterState | None = None
    """The cluster as observed (None: not observed, `Session.resolve(observe=False)`)."""
    gpus: GpuReality | None = None
    """What the GPUs really hold (None when not probed)."""

    @property
    def placement(self) -> PlacementResult:
        return self.resolved.placement

    def desired(self) -> ClusterState:
        """The desired state; raises RenderError/GatewayError when the placement cannot be rendered."""
        return self.resolved.state()


@dataclass(frozen=True)
class Prepared:
    placement: PlacementResult
    desired: ClusterState
    observed: ClusterState
    diff: DiffResult
    plan: Plan
    gpus: GpuReality | None = None
    """What the GPUs really hold (None when not discovered): foreign use, smaller or missing GPUs."""
    calibration: tuple[str, ...] = ()
    """One line per model whose reservation a measurement raised ("measured … on node:0, estimate …")."""
    calibration_warnings: tuple[str, ...] = ()
    """Running replicas measured above their estimate that no longer fit where they run."""
    notes: tuple[str, ...] = ()
    """What nodes must be set to that homelab does not set itself (an Ollama node's OLLAMA_MAX_LOADED_MODELS)."""
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    """The memory profiles the placement used (measurements applied)."""


class CachingConnect:
    """Opens each node's driver once, so observe and apply share connections."""

    def __init__(self, factory: Callable[[Node], DockerNode]) -> None:
        self.factory = factory
        self.opened: dict[str, DockerNode] = {}

    def __call__(self, node: Node) -> DockerNode:
        if node.name not in self.opened:
            self.opened[node.name] = self.factory(node)
        return self.opened[node.name]

    def close(self) -> None:
        """Close every driver opened (those that can be: the Docker SDK client, an SSH tunnel)."""
        for driver in self.opened.values():
            _close(driver)
        self.opened.clear()


class CachingOllama:
    """Opens each node's Ollama driver once (the HTTP one unless a factory is given)."""

    def __init__(self, factory: Callable[[Node], OllamaNode] | None = None) -> None:
        self.factory = factory
        self.opened: dict[str, OllamaNode] = {}

    def __call__(self, node: Node) -> OllamaNode:
        if node.name not in self.opened:
            if self.factory is not None:
                self.opened[node.name] = self.factory(node)
            else:
                assert node.ollama is not None
                self.opened[node.name] = OllamaHttp(node.name, node.ollama.url)
        return self.opened[node.name]

    def close(self) -> None:
        for driver in self.opened.values():
            _close(driver)
        self.opened.clear()


GatewayFactory = Callable[[GatewayState], Gateway]
"""Opens the gateway driver for the desired gateway (the local one, or a fake in tests)."""


def local_gateway(state_dir: Path) -> GatewayFactory:
    """The gateway on this machine (mode process or external), its files in `state_dir`."""
    return lambda desired: LocalGateway(desired, state_dir)


def gateways(spec: ClusterSpec, connect: Callable[[Node], DockerNode], state_dir: Path) -> GatewayFactory:
    """The gateway as the spec runs it: mode container through its node's Docker engine (`connect`, so observe
    and apply share the connection), the others on this machine."""

    def make(desired: GatewayState) -> Gateway:
        if desired.mode == "container" and desired.node is not None:
            return ContainerGateway(desired, connect(spec.node(desired.node)), spec.cluster.name)
        return LocalGateway(desired, state_dir)

    return make


# --------------------------------------------------------------------------- ports held on this machine

PortHolder = Callable[[str, int], str | None]


def is_this_machine(node: Node) -> bool:
    """Whether the node is the machine homelab runs on: a loopback address, or a local Docker socket."""
    if node.address == "localhost":
        return True
    try:
        if ipaddress.ip_address(node.address.strip("[]")).is_loopback:
            return True
    except ValueError:
        pass
    return node.docker is not None and node.docker.endpoint.startswith("unix://")


def port_holder(address: str, port: int) -> str | None:
    """What listens on ADDRESS:PORT of this machine, in words (None: nothing answers a connect there)."""
    host = address.strip("[]")
    try:
        with socket.create_connection((host, port), timeout=0.5):
            pass
    except OSError:
        return None
    what = "a process that is not a container homelab manages"
    try:
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            server = client.get(f"http://{url_host(address)}:{port}/").headers.get("server")
    except httpx.HTTPError:
        server = None
    return f"{what} (it answers HTTP, Server: {server[:60]})" if server else what


def check_ports(spec: ClusterSpec, prepared: Prepared, holder: PortHolder) -> None:
    """PortConflict when a container the plan starts (a new one, or one not running) would listen on a port of a
    node that is this machine that something else holds already (a port held by one of homelab's own running
    containers on that node is its own: a plan stops that one first)."""
    for node in spec.nodes:
        want = prepared.desired.nodes.get(node.name)
        have = prepared.observed.nodes.get(node.name)
        if want is None or have is None or not have.reachable or not is_this_machine(node):
            continue
        running = {c.name for c in have.containers if c.status == "running"}
        ours = {c.config.port for c in have.containers if c.config is not None and c.status == "running"}
        for c in want.containers:
            if c.config is None or c.name in running or c.config.port in ours:
                continue
            held = holder(url_host(node.address), c.config.port)
            if held is not None:
                raise PortConflict(
                    f"node {node.name}: container {c.name} would listen on {node.address}:{c.config.port}, which"
                    f" {held} holds; stop it or give the node's llamacpp.ports another range"
                )


# --------------------------------------------------------------------------- wiring and the session

STATE_ENV = "HOMELAB_STATE_DIR"

ConnectFactory = Callable[[ClusterSpec], Callable[[Node], DockerNode]]
HealthProbe = Callable[[ClusterSpec, ClusterState | None], HealthReport]


def docker_connect(spec: ClusterSpec) -> Callable[[Node], DockerNode]:
    return lambda node: DockerEngine(node, spec.cluster.name)


@dataclass(frozen=True)
class Wiring:
    """How homelab reaches the world: one value, passed down, instead of module globals.

    The defaults are the real systems; a test builds a `Wiring` with fakes and hands it to the CLI
    (`CliRunner().invoke(app, args, obj=wiring)`) or to the watch loop."""

    connect: ConnectFactory = docker_connect
    """Each node's Docker engine (unix://, tcp://, ssh://)."""
    ollama: Callable[[Node], OllamaNode] | None = None
    """Each node's Ollama server (None: its HTTP API)."""
    gateway: Callable[[Path], GatewayFactory] | None = None
    """The gateway, given the state directory (None: `gateways`: on this machine, or in its node's engine)."""
    gpu_probe: GpuProbe = discover_gpus
    """What the GPUs really hold (nvidia-smi, locally or over SSH)."""
    health_check: HealthCheck = wait_healthy
    """How a started container is waited for."""
    health: HealthProbe = check
    """How every endpoint is probed (`homelab health`, the watch's sweep)."""
    host_cpu: HostCpu = local_cpu_flags
    """This machine's CPU flags, for the nodes that are this machine and state no `cpu:` (`host_cpus`)."""
    solve: SolveParams = DEFAULT_SOLVE
    port_holder: PortHolder = port_holder
    """What holds ADDRESS:PORT on a node that is this machine (None: nothing; `Session.prepare` checks the
    ports a plan would start a container on)."""


def state_dir(spec: ClusterSpec | None, override: Path | None) -> Path:
    """Where events, the apply lock and the watch status live: --state-dir, $HOMELAB_STATE_DIR, the spec's
    `watch.state_dir` (its default before any spec is loaded)."""
    if override is not None:
        return override
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    return Path((spec.watch if spec is not None else Watch()).state_dir).expanduser()


def health_timeouts(spec: ClusterSpec) -> dict[str, float]:
    """How long each llama.cpp node's containers may take to answer /health after a start."""
    return {n.name: n.llamacpp.health_timeout for n in spec.nodes if n.llamacpp is not None}


@dataclass
class Session:
    """One reconcile's connections: opened on first use through `wiring`, closed on exit (a context manager).

    `prepare()` observes and plans; `executor()` applies through the same connections."""

    spec: ClusterSpec
    wiring: Wiring = field(default_factory=Wiring)
    state_dir: Path | None = None
    """Events, lock and the local gateway's files (default: `state_dir(spec, None)`)."""
    connect: CachingConnect = field(init=False)
    ollama: CachingOllama = field(init=False)
    gateway: GatewayFactory = field(init=False)
    _gateways: list[Gateway] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.state_dir is None:
            self.state_dir = state_dir(self.spec, None)
        self.connect = CachingConnect(self.wiring.connect(self.spec))
        self.ollama = CachingOllama(self.wiring.ollama)
        factory = self.wiring.gateway
        make = factory(self.state_dir) if factory is not None else gateways(self.spec, self.connect, self.state_dir)

        def opened(desired: GatewayState) -> Gateway:
            driver = make(desired)
            self._gateways.append(driver)
            return driver

        self.gateway = opened

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def resolve(self, *, observe: bool = True, gpus: bool = True) -> Resolution:
        """What runs where, the one way every command works it out (`controller.core.resolve`): observe the nodes
        (and their Ollama servers), probe the GPUs (`gpus`), read the measurements kept in the state directory and
        what Ollama says of its models, then place with `wiring.solve` and render. Writes nothing.

        `observe=False` touches no network (`homelab place`, `route --no-health`): replicas are placed as from
        scratch, with every stored measurement whose configuration the spec has not changed since."""
        assert self.state_dir is not None
        stored = calibration.read(self.state_dir)
        cpus = host_cpus(self.spec, self.wiring.host_cpu)
        if not observe:
            return Resolution(
                resolve(self.spec, params=self.wiring.solve, measurements=stored, read_header=read_header, cpus=cpus)
            )
        observed = observe_nodes(self.spec, self.connect, self.ollama, state=self.state_dir)
        reality = observe_gpus(self.spec, observed, self.connect, self.wiring.gpu_probe) if gpus else None
        resolved = resolve(
            self.spec,
            params=self.wiring.solve,
            observed=observed,
            measurements=stored,
            foreign_vram=reality.foreign_vram if reality is not None else None,
            read_header=read_header,
            ollama_info=ollama_model_info(self.spec, observed, self.ollama),
            cpus=cpus,
        )
        return Resolution(resolved, observed, reality)

    def prepare(self, *, gateway: bool = True, gpus: bool = True) -> Prepared:
        """Resolve, observe the gateway, diff and plan (`gateway`: observe and plan the gateway; `gpus`: probe
        them, so that memory held by other processes is left alone and smaller or missing GPUs are planned as
        they are). Writes nothing: measurements are recorded after an apply (`calibrate`) and by the watch
        (`record`)."""
        found = self.resolve(gpus=gpus)
        resolved = found.resolved
        assert found.observed is not None
        observed = found.observed
        desired = resolved.state()
        planned = desired
        if gateway and desired.gateway is not None:
            observed = replace(observed, gateway=observe_gateway(desired.gateway, self.gateway(desired.gateway)))
        else:
            planned = replace(desired, gateway=None)
        result = diff(planned, observed, unplaced={u.model for u in resolved.placement.unplaced})
        plan = make_plan(self.spec.cluster.name, result, observed.fingerprint())
        prepared = Prepared(
            resolved.placement,
            desired,
            observed,
            result,
            plan,
            found.gpus,
            resolved.calibration,
            resolved.warnings,
            resolved.notes,
            resolved.profiles,
        )
        # A port the plan starts a container on that a process of this machine holds is a PortConflict.
        check_ports(self.spec, prepared, self.wiring.port_holder)
        return prepared

    def record(self, prepared: Prepared, *, attempts: int = 1) -> list[calibration.Measurement]:
        """Keep what `prepared` observed in the state directory: what each running managed container holds
        (`controller.effects.calibration`: the next plan reserves it) and the sha256s of the model files checked.
        The watch calls it after each run; `calibrate` after an apply. Never called while planning."""
        assert self.state_dir is not None
        keep_sha256s(self.state_dir, prepared.observed)
        return calibration.record(
            self.state_dir, self.spec, prepared.observed, self.connect, prepared.gpus, attempts=attempts
        )

    def calibrate(self) -> list[calibration.Measurement]:
        """Observe again and `record` (after an apply: what the new containers really hold)."""
        assert self.state_dir is not None
        observed = observe_nodes(self.spec, self.connect, self.ollama, state=self.state_dir)
        gpus = observe_gpus(self.spec, observed, self.connect, self.wiring.gpu_probe)
        keep_sha256s(self.state_dir, observed)
        return calibration.record(
            self.state_dir, self.spec, observed, self.connect, gpus, attempts=calibration.AFTER_APPLY_ATTEMPTS
        )

    def executor(
        self,
        prepared: Prepared,
        *,
        nodes: Collection[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_progress: Callable[[str, str, int, int], None] | None = None,
    ) -> Executor:
        """An executor over this session's connections (`nodes`: only these nodes' drivers, no gateway)."""
        assert self.state_dir is not None
        engines = {k: v for k, v in self.connect.opened.items() if nodes is None or k in nodes}
        desired_gateway = prepared.desired.gateway if nodes is None else None
        return Executor(
            self.spec.cluster.name,
            engines,
            self.state_dir,
            health_timeout=health_timeouts(self.spec),
            health_check=self.wiring.health_check,
            on_event=on_event,
            on_progress=on_progress,
            ollama=dict(self.ollama.opened) if nodes is None else {},
            gateway=self.gateway(desired_gateway) if desired_gateway is not None else None,
            recheck=lambda: self.prepare(gateway=nodes is None).observed.fingerprint(),
        )

    def close(self) -> None:
        """Close every driver this session opened (Docker clients, SSH tunnels, HTTP clients)."""
        self.connect.close()
        self.ollama.close()
        for driver in self._gateways:
            _close(driver)
        self._gateways.clear()


def _close(driver: object) -> None:
    close = getattr(driver, "close", None)
    if callable(close):
        close()
