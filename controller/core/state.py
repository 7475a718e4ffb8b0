"""The one schema that desired and observed state share.

`controller.core.desired.render` builds a `ClusterState` from the spec and the
placement; `controller.effects.observe` builds one from the real cluster. Because both
are the same plain, frozen values, `controller.core.diff` is a data comparison and a
second reconcile after a successful apply finds nothing to do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# Labels on everything homelab creates. Anything without LABEL_CLUSTER is never touched.
LABEL_CLUSTER = "homelab.cluster"
LABEL_NODE = "homelab.node"
LABEL_MODEL = "homelab.model"
LABEL_REPLICA = "homelab.replica"
LABEL_HASH = "homelab.spec-hash"
LABEL_CONFIG = "homelab.config"
"""The container's desired configuration as compact JSON, so a diff can say what changed."""
LABEL_ROLE = "homelab.role"
"""On containers (and volumes) that are not model servers: `helper` (short-lived file copies), `gateway`."""
LABEL_WRITES = "homelab.writes"
"""On a helper container that writes into a volume: `VOLUME/NAME` (a model file it copies or removes) or `VOLUME`
(text files it installs). A running one whose apply is gone (killed) is stopped before that file is written again,
and at the start of the next apply."""
LABEL_POOL = "homelab.pool"
"""On a swap pool's router container: the pool's key (NODE-gpuI or NODE-cpu)."""

MODELS_MOUNT = "/models"
"""Where the model volume is mounted (read-only) in a llama.cpp container."""
PRESET_PATH = "/homelab-pool.ini"
"""Where a swap pool's `--models-preset` file is written into its container (before the container starts)."""


def url_host(address: str) -> str:
    """A node address as the host part of a URL: an IPv6 address in brackets."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def health_url(address: str, port: int) -> str:
    """`http://ADDRESS:PORT/health`."""
    return f"http://{url_host(address)}:{port}/health"


@dataclass(frozen=True)
class PoolMember:
    """One on-demand model of a swap pool: a section of the router's preset, loaded on request."""

    model: str
    alias: str
    """The name requests use (the preset section), the model's `served_name`."""
    model_file: str
    context: int
    gpu_layers: int
    cache_type: str
    ttl: float
    """Seconds idle before llama-server puts its process to sleep (`sleep-idle-seconds`)."""

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> PoolMember:
        return cls(model=name, **{k: v for k, v in data.items() if k != "model"})


@dataclass(frozen=True)
class ContainerConfig:
    """Everything about a managed container whose change means replacing it."""

    image: str
    command: tuple[str, ...]
    """Arguments to the image's entrypoint (llama-server)."""
    model_file: str
    """The file's path inside `volume`: its name in the node's model volume, or its path in a volume of the
    user's that the model is read from in place (`source.volume`)."""
    context: int
    gpu_layers: int
    port: int
    alias: str
    cache_type: str
    gpus: tuple[int, ...]
    """GPU indices given to the container (empty: no GPU)."""
    gpu_access: str
    """nvidia (device requests), dri (/dev/dri) or none."""
    volume: str
    """The volume mounted read-only at MODELS_MOUNT: the node's model volume, or the user's (`source.volume`)."""
    restart_policy: str = "unless-stopped"
    network_mode: str = "host"
    members: tuple[PoolMember, ...] = ()
    """A swap pool's router (llama-server in router mode): its on-demand models, by name. Empty for a model's
    own container. A pool's `model_file`, `alias` and `cache_type` are empty, `context` 0, `gpu_layers` the most
    any member has."""
    preset: str = ""
    """A swap pool's `--models-preset` INI text (written to PRESET_PATH in the container before it starts)."""

    @property
    def pool(self) -> bool:
        return bool(self.members)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["command"] = list(self.command)
        data["gpus"] = list(self.gpus)
        # A pool's members by name, so a diff says `members.chat.context 4096 → 8192`; a model's own container
        # carries neither key (its hash, and so every container that ran before pools existed, is unchanged).
        del data["members"], data["preset"]
        if self.members:
            data["members"] = {m.model: {k: v for k, v in asdict(m).items() if k != "model"} for m in self.members}
            data["preset"] = self.preset
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ContainerConfig:
        fields = dict(data)
        fields["command"] = tuple(fields.get("command", ()))
        fields["gpus"] = tuple(fields.get("gpus", ()))
        members = fields.get("members") or {}
        fields["members"] = tuple(PoolMember.from_json(str(k), v) for k, v in sorted(dict(members).items()))
        return cls(**fields)

    def digest(self) -> str:
        """A short, stable hash of the configuration (the `homelab.spec-hash` label)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ContainerState:
    """A llama.cpp container: desired (from the spec) or observed (from Docker)."""

    name: str
    node: str
    model: str
    replica: int
    config: ContainerConfig | None
    """None when an observed container's config label is missing or unreadable."""
    config_hash: str
    health_url: str
    status: str = "running"
    """Docker's state: running, exited, created, restarting, paused, dead. Desired: running."""
    exit_code: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.config is not None and bool(self.config.gpus)

    @property
    def pool(self) -> bool:
        """A swap pool's router container (its `model` is "": it serves `config.members`)."""
        return self.config is not None and self.config.pool

    @property
    def serves(self) -> tuple[str, ...]:
        """The names its llama-server lists on `/v1/models`: the `--alias`, or a router's members' aliases
        (empty when the config is unknown)."""
        if self.config is None:
            return ()
        if self.config.pool:
            return tuple(m.alias for m in self.config.members)
        return (self.config.alias,) if self.config.alias else ()


def pool_container_name(key: str) -> str:
    """`homelab-pool-workstation-gpu0`: the router container of the swap pool with that key."""
    return f"homelab-pool-{key}"


@dataclass(frozen=True)
class VolumeState:
    node: str
    name: str


@dataclass(frozen=True)
class FileState:
    """A model file inside a volume. Desired files also say where to copy them from."""

    node: str
    volume: str
    name: str
    size: int | None = None
    """Bytes. Desired: the source's size (None when the source could not be looked at); observed: the file's."""
    sha256: str | None = None
    """Desired: the spec's `source.sha256`. Observed: the file's, when it was checked (the spec gives one and the
    size is right); None when not checked."""
    source: str | None = None
    """Path of the GGUF on the node (desired only)."""
    mtime: int | None = None
    """Observed only: the file's modification time (seconds), which keys the cache of its sha256."""


OLLAMA_PREFIX = "homelab/"
"""Derived Ollama models homelab creates are named `homelab/<model>`; nothing else is homelab's."""


def ollama_tag(name: str) -> str:
    """Ollama's full name for a model: `llama3` → `llama3:latest` (the tag defaults to latest)."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


@dataclass(frozen=True)
class OllamaModelState:
    """A derived Ollama model (`homelab/<model>`): a pulled base tag with the placement's parameters."""

    node: str
    name: str
    """Full Ollama name, e.g. `homelab/qwen2.5-14b:latest`."""
    model: str
    """The spec model it serves ("" when observed and not in the spec)."""
    base: str
    """The tag it is made from, e.g. `qwen2.5:14b` (observed: Ollama's `details.parent_model`)."""
    num_gpu: int | None
    """Layers on the GPU (Ollama's `num_gpu` parameter), from the placement."""
    num_ctx: int | None
    preload: bool = False
    """Desired: keep it loaded. Observed: it is loaded now (`/api/ps`)."""
    keep_alive: float | None = None
    """Seconds a preloaded model stays loaded; None: forever (desired only). An on-demand model's `ttl`: how long
    it stays after a request (the gateway sends it as `keep_alive`)."""


@dataclass(frozen=True)
class OllamaNodeState:
    """A node's Ollama server: desired (tags to pull, derived models) or observed."""

    url: str
    reachable: bool = True
    error: str | None = None
    tags: tuple[str, ...] = ()
    """Base tags: desired, those the derived models need; observed, every model not named homelab/…."""
    models: tuple[OllamaModelState, ...] = ()
    prune: bool = False
    """Desired: delete tags no derived model needs (`ollama.prune`); off, hand-pulled models stay."""


@dataclass(frozen=True)
class GatewayState:
    """The LiteLLM proxy's config file: desired (rendered) or observed (read back)."""

    mode: str
    """external, process or container (spec `gateway.mode`)."""
    path: str
    """Where the config file is: on the machine running homelab (process, external), or, for mode container,
    `NODE:VOLUME/config.yaml` — in the gateway's Docker volume on its node."""
    text: str | None
    """The config YAML; None when observed and the file does not exist."""
    url: str
    """The proxy's base URL; `/health/liveliness` is checked there."""
    command: tuple[str, ...] = ()
    """mode process: how the proxy is started (without the secret, which goes in its environment)."""
    key_env: str = ""
    """The environment variable the config reads the master key from."""
    key_ref: str = ""
    """The provider reference the master key is resolved from at restart (env:, file:, cmd:)."""
    running: bool = True
    """Observed, for a proxy homelab runs (process, container): it answers /health/liveliness."""
    node: str | None = None
    """mode container: the node it runs on (nothing is planned for it while that node is unreachable)."""
    image: str = ""
    """mode container: the LiteLLM image."""
    run_hash: str = ""
    """mode container: a hash of how its container runs (image, arguments, the key's variable name — never the
    key); observed: the container's `homelab.spec-hash` label, "" when there is no container."""
    files: tuple[tuple[str, str], ...] = ()
    """Files that go next to the config, (name, text): the classifier plugin of the `auto` model. The config
    names each one's digest, so a change to them changes `text` too."""

    @property
    def digest(self) -> str:
        return hashlib.sha256((self.text or "").encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ServiceContainer:
    """A managed container that is not a model server — the LiteLLM gateway: how it runs.

    Its configuration file is in `volume`, mounted read-only at `mount`; its environment
    (which may hold a secret) is not part of it: the driver is handed that at the moment of use.
    """

    name: str
    role: str
    """The `homelab.role` label (`gateway`): such containers are neither model servers nor foreign."""
    image: str
    command: tuple[str, ...]
    """Arguments to the image's entrypoint."""
    volume: str
    mount: str
    config_hash: str
    """The `homelab.spec-hash` label."""
    network_mode: str = "host"
    restart_policy: str = "unless-stopped"


@dataclass(frozen=True)
class NodeState:
    node: str
    reachable: bool = True
    error: str | None = None
    """Why the node could not be observed."""
    volumes: tuple[VolumeState, ...] = ()
    files: tuple[FileState, ...] = ()
    containers: tuple[ContainerState, ...] = ()
    foreign_containers: tuple[str, ...] = ()
    """Names of containers without homelab labels (observed only; never touched)."""
    ollama: OllamaNodeState | None = None
    """The node's Ollama server, when the spec gives it one."""
    foreign: tuple[ForeignContainer, ...] = ()
    """Observed only: the unlabelled containers, with their ports and where their model comes from."""
    volume_names: tuple[str, ...] = ()
    """Observed only: every volume on the node's Docker engine, labelled or not (a model read in place from a
    volume of the user's, `source.volume`, needs it there)."""
    adopts: tuple[tuple[str, str], ...] = ()
    """Desired only: (managed container, the unlabelled container it replaces) for each `adopt:` placed here."""
    services: tuple[str, ...] = ()
    """homelab's service containers on the node (the gateway's): desired, where the spec runs one;
    observed, those that exist. One that exists where the spec no longer runs it is removed."""
    model_volume: str | None = None
    """Desired state only: the node's `llamacpp.volume`, the one volume whose files homelab prunes."""
    source_sizes: tuple[tuple[str, int], ...] = ()
    """Observed only: (GGUF path, bytes) of the model sources as they are now for this node — a `source.node`
    file of this node (read by the helper that lists its volume), any other one as this machine sees it; a
    source that could not be looked at is left out. The desired files carry these sizes (`desired.render`)."""
    missing_helper_image: str | None = None
    """Observed only: the node's `llamacpp.helper_image` when it is not on the node (None: it is, or the node has
    no llama.cpp). File steps run in it: a plan that copies or removes a file there is refused."""
    spec_files: tuple[str, ...] = ()
    """Desired state only: every model file name the spec mentions, placed here or not. A file in a managed
    volume that is neither wanted here nor named in the spec is pruned; one of a model placed elsewhere
    for now is kept (copying it back would cost gigabytes)."""


ADOPTED_SUFFIX = "-adopted-by-homelab"
"""What an adopted container's name is given when homelab sets it aside (`DockerNode.set_aside`)."""


@dataclass(frozen=True)
class ForeignContainer:
    """A container without homelab labels (observed): never touched unless the spec adopts it."""

    name: str
    ports: tuple[int, ...] = ()
    """Host ports it holds (its -p mappings; llama-server's --port on the host network)."""
    bind_model: str | None = None
    """The host directory it reads its model through, when that is a bind mount."""
    running: bool = True
    """Docker's status is `running` (a stopped one holds no port: an adopted container homelab set aside)."""


@dataclass(frozen=True)
class ClusterState:
    cluster: str
    nodes: Mapping[str, NodeState]
    gateway: GatewayState | None = None

    def fingerprint(self) -> str:
        """A hash of the whole state: a saved plan is refused when the cluster has changed since."""
        text = json.dumps(_jsonable(self), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def container_to_json(c: ContainerState) -> dict[str, Any]:
    return {
        "name": c.name,
        "node": c.node,
        "model": c.model,
        "replica": c.replica,
        "config": c.config.to_json() if c.config is not None else None,
        "config_hash": c.config_hash,
        "health_url": c.health_url,
        "status": c.status,
        "exit_code": c.exit_code,
        "labels": dict(c.labels),
    }


def container_from_json(data: Mapping[str, Any]) -> ContainerState:
    config = data.get("config")
    return ContainerState(
        name=data["name"],
        node=data["node"],
        model=data["model"],
        replica=int(data["replica"]),
        config=ContainerConfig.from_json(config) if config is not None else None,
        config_hash=data["config_hash"],
        health_url=data["health_url"],
        status=data.get("status", "running"),
        exit_code=data.get("exit_code"),
        labels=dict(data.get("labels", {})),
    )


def ollama_model_to_json(m: OllamaModelState) -> dict[str, Any]:
    return asdict(m)


def ollama_model_from_json(data: Mapping[str, Any]) -> OllamaModelState:
    return OllamaModelState(**dict(data))


def gateway_to_json(g: GatewayState) -> dict[str, Any]:
    data = asdict(g)
    data["command"] = list(g.command)
    return data


def gateway_from_json(data: Mapping[str, Any]) -> GatewayState:
    fields = dict(data)
    fields["command"] = tuple(fields.get("command", ()))
    fields["files"] = tuple((str(name), str(text)) for name, text in fields.get("files", ()))
    return GatewayState(**fields)


# --------------------------------------------------------------------------- the gateway's container

GATEWAY_CONTAINER = "homelab-gateway"
"""mode container: the proxy's container on the gateway's node (labelled `homelab.role=gateway`)."""
GATEWAY_VOLUME = "homelab-gateway"
"""mode container: the Docker volume that holds its config (and the files next to it)."""
GATEWAY_MOUNT = "/etc/homelab-litellm"
"""Where that volume is mounted, read-only, in the proxy's container."""
GATEWAY_CONFIG = "config.yaml"
GATEWAY_ROLE = "gateway"


def container_run_hash(image: str, command: tuple[str, ...], key_env: str) -> str:
    """How the gateway's container runs, hashed (its `homelab.spec-hash`): a change means re-creating it.

    The master key's value is not in it (only the variable's name): a new key is picked up at the next restart.
    """
    what = {
        "image": image,
        "command": list(command),
        "env": sorted([key_env, "LITELLM_LOCAL_MODEL_COST_MAP"]),
        "volume": GATEWAY_VOLUME,
        "mount": GATEWAY_MOUNT,
        "network_mode": "host",
        "restart_policy": "unless-stopped",
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def gateway_container(desired: GatewayState) -> ServiceContainer:
    """mode container: the proxy's container, from the desired gateway."""
    return ServiceContainer(
        name=GATEWAY_CONTAINER,
        role=GATEWAY_ROLE,
        image=desired.image,
        command=desired.command,
        volume=GATEWAY_VOLUME,
        mount=GATEWAY_MOUNT,
        config_hash=desired.run_hash,
    )
