"""One reconcile, from spec to plan: observe → place → render → diff → plan, and the Session that runs it.

The only I/O here is what the drivers do while observing; everything after is
pure (`controller.core`). Every caller that reconciles — `homelab reconcile`
and its dry run, `homelab watch`, recovery's container restart, `homelab
gateway render` — does it through one `Session`:

    with Session(spec, wiring, state_dir) as session:     # opens nothing yet
        prepared = session.prepare()                      # observe, place, render, diff, plan
        result = session.executor(on_event=...).apply(prepared.plan)
    # every driver the session opened is closed here (Docker clients, SSH tunnels)

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

from controller.core.desired import ollama_requirements, render, source_sizes
from controller.core.diff import DiffResult, PortConflict, diff
from controller.core.plan import Plan, make_plan
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
from controller.effects.observe import observe, observe_gateway, ollama_model_info
from solver.explain import calibration_lines
from solver.gguf import read_header
from solver.place import SolveParams, place
from solver.problem import CurrentAssignment, PlacementResult
from solver.profiles import PlannedCpu, profiles_for
from specs.model import ClusterSpec, Node, Watch

DEFAULT_SOLVE = SolveParams(time_limit=10.0, workers=1)
"""The solver settings every reconcile uses (10 deterministic seconds, one worker: the same plan every time)."""


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


def current_placement(observed: ClusterState) -> dict[tuple[str, int], CurrentAssignment]:
    """Where managed replicas run now, for the solver's stability objective."""
    out: dict[tuple[str, int], CurrentAssignment] = {}
    for node in observed.nodes.values():
        for c in node.containers:
            if c.config is None:
                continue  # unreadable config label: its place is unknown, and it will be replaced anyway
            gpus = c.config.gpus
            for m in c.config.members:  # a swap pool's members are where their pool is
                out[m.model, 0] = CurrentAssignment(
                    node.node, gpus, m.gpu_layers, any_gpu=not gpus and m.gpu_layers > 0
                )
            if not c.pool:
                layers = c.config.gpu_layers
                out[c.model, c.replica] = CurrentAssignment(node.node, gpus, layers, any_gpu=not gpus and layers > 0)
    return out


def current_ports(observed: ClusterState) -> dict[tuple[str, str], int]:
    return {(node.node, c.name): c.config.port for node in observed.nodes.values() for c in node.containers if c.config}


def prepare(
    spec: ClusterSpec,
    connect: Callable[[Node], DockerNode],
    params: SolveParams | None = None,
    gpu_probe: GpuProbe | None = None,
    *,
    ollama: Callable[[Node], OllamaNode] | None = None,
    gateway: GatewayFactory | None = None,
    state: Path | None = None,
    cpus: Mapping[str, PlannedCpu] | None = None,
) -> Prepared:
    """`gpu_probe` (e.g. `controller.drivers.gpu.discover_gpus`) makes the placement leave memory held by
    other processes alone and plan smaller or missing GPUs as they are (`controller.effects.gpu_use`).
    `state` (the state directory) keeps what the running containers really hold (`controller.effects.calibration`):
    they are measured, and the placement reserves max(estimate, measured + margin) for them. `cpus` (`host_cpus`)
    is the CPU each node's estimates are made for (default: the spec's `cpu:` alone)."""
    # Ollama servers are observed through `ollama` (default: HTTP); the gateway through `gateway`
    # when given (without it, the gateway is neither observed nor planned).
    ollama = ollama if ollama is not None else CachingOllama()
    observed = observe(spec, connect, ollama, state=state)
    gpus = observe_gpus(spec, observed, connect, gpu_probe) if gpu_probe is not None else None
    measured = calibration.current(calibration.record(state, spec, observed, connect, gpus), observed) if state else []
    info = ollama_model_info(spec, observed, ollama)
    running = current_placement(observed)
    placement, profiles, _ = calibration.place_calibrated(
        spec,
        measured,
        lambda profiles: place(
            spec,
            profiles,
            current=running,
            foreign_vram=gpus.foreign_vram if gpus is not None else None,
            params=params or DEFAULT_SOLVE,
        ),
        lambda seen: profiles_for(spec, read_header=read_header, ollama_info=info, measured=seen, cpus=cpus),
        current_ports(observed),
    )
    lines, warnings = calibration_lines(profiles, placement, running)
    desired = render(spec, placement, current_ports(observed), source_sizes(observed))
    planned = desired
    if gateway is not None and desired.gateway is not None:
        observed = replace(observed, gateway=observe_gateway(desired.gateway, gateway(desired.gateway)))
    else:
        planned = replace(desired, gateway=None)
    result = diff(planned, observed, unplaced={u.model for u in placement.unplaced})
    plan = make_plan(spec.cluster.name, result, observed.fingerprint())
    notes = tuple(ollama_requirements(spec, placement))
    return Prepared(placement, desired, observed, result, plan, gpus, lines, warnings, notes)


def desired_state(
    spec: ClusterSpec,
    params: SolveParams | None = None,
    running: ClusterState | None = None,
    cpus: Mapping[str, PlannedCpu] | None = None,
) -> ClusterState:
    """Where the replicas go and on which ports, placed as a reconcile places them but without observing the
    cluster (`running`: the containers seen running, so replicas stay and keep their ports; `cpus`: as for
    `prepare`) — for health probes and routing. Raises RenderError/GatewayError."""
    placement = place(
        spec,
        profiles_for(spec, read_header=read_header, cpus=cpus),
        current=current_placement(running) if running is not None else None,
        params=params or DEFAULT_SOLVE,
    )
    return render(spec, placement, current_ports(running) if running is not None else None)


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

    def prepare(self, *, gateway: bool = True, gpus: bool = True) -> Prepared:
        """Observe, place, render, diff and plan (`gateway`: observe and plan the gateway; `gpus`: probe them).
        A port the plan starts a container on that a process of this machine holds is a PortConflict."""
        prepared = prepare(
            self.spec,
            self.connect,
            self.wiring.solve,
            self.wiring.gpu_probe if gpus else None,
            ollama=self.ollama,
            gateway=self.gateway if gateway else None,
            state=self.state_dir,
            cpus=host_cpus(self.spec, self.wiring.host_cpu),
        )
        check_ports(self.spec, prepared, self.wiring.port_holder)
        return prepared

    def calibrate(self) -> list[calibration.Measurement]:
        """Measure what the running managed containers hold now and keep it in the state directory (after an
        apply: the next plan reserves it)."""
        assert self.state_dir is not None
        observed = observe(self.spec, self.connect, self.ollama)
        gpus = observe_gpus(self.spec, observed, self.connect, self.wiring.gpu_probe)
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
