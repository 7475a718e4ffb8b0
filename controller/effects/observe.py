"""Read the actual state of every node, concurrently, through its driver.

A node whose engine does not answer is observed as unreachable — never as
empty — so the plan does not try to recreate everything on it.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from controller.core.importer import container_argv, container_ports, model_mount, parse_server_args
from controller.core.state import (
    GATEWAY_CONTAINER,
    LABEL_CLUSTER,
    OLLAMA_PREFIX,
    ClusterState,
    FileState,
    ForeignContainer,
    GatewayState,
    NodeState,
    OllamaNodeState,
    ollama_tag,
)
from controller.drivers.base import DockerNode, DriverError, Gateway, NodeUnreachable, OllamaNode
from solver.profiles import OllamaInfo
from specs.enums import Runtime
from specs.files import atomic_write
from specs.model import ClusterSpec, Node, gguf_file_name

SERVICE_CONTAINERS = (GATEWAY_CONTAINER,)
"""Service containers homelab may run on a node."""

Connect = Callable[[Node], DockerNode]
"""Opens a node's Docker driver (the real one, or a fake in tests)."""


OllamaConnect = Callable[[Node], OllamaNode]
"""Opens a node's Ollama driver (the HTTP one, or a fake in tests)."""


def observe_ollama(node: Node, connect: OllamaConnect) -> OllamaNodeState | None:
    """Tags on the server (prune candidates), and homelab's derived models with their parameters."""
    if node.ollama is None:
        return None
    url = node.ollama.url
    try:
        driver = connect(node)
        names = driver.list_models()
        loaded = set(driver.loaded())
        ours = [name for name in names if name.startswith(OLLAMA_PREFIX)]
        models = [replace(state, preload=state.name in loaded) for state in driver.derived_many(ours)]
    except DriverError as exc:
        return OllamaNodeState(url=url, reachable=False, error=str(exc))
    return OllamaNodeState(
        url=url,
        tags=tuple(sorted(n for n in names if not n.startswith(OLLAMA_PREFIX))),
        models=tuple(sorted(models, key=lambda m: m.name)),
    )


def ollama_model_info(spec: ClusterSpec, observed: ClusterState, connect: OllamaConnect) -> dict[str, OllamaInfo]:
    """For each Ollama model without a declared `memory:`: what /api/show says of its tag, from a node that has it."""
    out: dict[str, OllamaInfo] = {}
    for model in spec.models:
        if model.runtime is not Runtime.OLLAMA or model.memory is not None or model.source.ollama is None:
            continue
        tag = ollama_tag(model.source.ollama)
        for node in spec.nodes:
            state = observed.nodes.get(node.name)
            have = state.ollama if state is not None else None
            if node.ollama is None or have is None or not have.reachable or tag not in have.tags:
                continue
            try:
                data = connect(node).model_info(tag)
            except DriverError:
                continue
            info, details = data.get("model_info"), data.get("details")
            quant = details.get("quantization_level") if isinstance(details, dict) else None
            out[model.name] = (info if isinstance(info, dict) else {}, quant if isinstance(quant, str) else None)
            break
    return out


def observe_gateway(desired: GatewayState | None, driver: Gateway | None) -> GatewayState | None:
    """The config file as it is, and (for a proxy homelab runs) whether it answers /health/liveliness."""
    if desired is None or driver is None:
        return None
    try:
        text = driver.read_config()
        # mode container: how its container runs now ("" none); a different hash means re-creating it.
        run_hash = driver.container_hash() if desired.mode == "container" else ""
    except OSError as exc:
        raise DriverError(f"gateway config {desired.path}: cannot read: {exc.strerror}") from None
    except NodeUnreachable:
        # mode container on a node that does not answer: its changes are deferred, never planned as if empty.
        return replace(desired, text=None, running=False, run_hash="")
    alive = driver.alive() if desired.mode != "external" else True
    return replace(desired, text=text, running=alive, run_hash=run_hash)


SHA256_CACHE_FILE = "sha256.json"
"""In the state directory: the sha256 of each checked model file, keyed by node, volume, name, size and mtime, so
that a file is hashed once (after each copy or change), not at every plan."""


@dataclass(frozen=True)
class FileChecks:
    """What observing a node's model files needs besides the node: the sizes of the GGUFs this machine sees
    (`local_source_sizes`), and the sha256s known already (`read_sha256_cache`; None: no file is hashed)."""

    local_sizes: Mapping[str, int] = field(default_factory=dict)
    sha256_cache: Mapping[tuple[str, str, str, int, int], str] | None = None


def local_source_sizes(spec: ClusterSpec) -> dict[str, int]:
    """GGUF path → bytes of each llama.cpp model source without `source.node`, as this machine sees it (a
    regular file; one that is missing or not a file is left out)."""
    out: dict[str, int] = {}
    for m in spec.models:
        gguf = m.source.gguf
        if m.runtime is not Runtime.LLAMACPP or gguf is None or m.source.node is not None:
            continue
        try:
            st = os.stat(gguf)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode):
            out[gguf] = st.st_size
    return out


def _node_sources(spec: ClusterSpec, node: str) -> list[str]:
    """The GGUF paths of the llama.cpp models whose file is on `node` (`source.node`)."""
    return sorted(
        {
            m.source.gguf
            for m in spec.models
            if m.runtime is Runtime.LLAMACPP
            and m.source.gguf is not None
            and m.source.node == node
            and posixpath.isabs(m.source.gguf)
        }
    )


def _expected(spec: ClusterSpec, node: str, sizes: Mapping[str, int]) -> dict[str, tuple[int | None, str]]:
    """File name in the node's model volume → (its source's size or None, the spec's sha256), for the files the
    spec gives a sha256 of."""
    out: dict[str, tuple[int | None, str]] = {}
    for m in spec.models:
        src = m.source
        if m.runtime is not Runtime.LLAMACPP or src.gguf is None or src.sha256 is None:
            continue
        if src.node is not None and src.node != node:
            continue
        out.setdefault(gguf_file_name(src.gguf), (sizes.get(src.gguf), src.sha256.lower()))
    return out


def read_sha256_cache(state: Path) -> dict[tuple[str, str, str, int, int], str]:
    """The cache of checked sha256s (`SHA256_CACHE_FILE`); a missing or unreadable file, or an entry that is not
    (node, volume, name, size, mtime) → 64 hex digits, counts as not cached."""
    try:
        data = json.loads((state / SHA256_CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    out: dict[tuple[str, str, str, int, int], str] = {}
    for entry in data.get("files", []) if isinstance(data, dict) and isinstance(data.get("files"), list) else []:
        if not isinstance(entry, list) or len(entry) != 6:
            continue
        node, volume, name, size, mtime, digest = entry
        if (
            all(isinstance(v, str) for v in (node, volume, name, digest))
            and all(type(v) is int for v in (size, mtime))
            and re.fullmatch(r"[0-9a-f]{64}", digest)
        ):
            out[node, volume, name, size, mtime] = digest
    return out


def write_sha256_cache(state: Path, old: Mapping[tuple[str, str, str, int, int], str], observed: ClusterState) -> None:
    """Keep the sha256 of every file observed with one (and the entries of nodes that did not answer)."""
    entries = {k: v for k, v in old.items() if k[0] not in observed.nodes or not observed.nodes[k[0]].reachable}
    for n in observed.nodes.values():
        for f in n.files:
            if f.sha256 is not None and f.size is not None and f.mtime is not None:
                entries[f.node, f.volume, f.name, f.size, f.mtime] = f.sha256
    if entries == dict(old):
        return
    rows = [[*key, digest] for key, digest in sorted(entries.items())]
    try:
        state.mkdir(parents=True, exist_ok=True)
        atomic_write(state / SHA256_CACHE_FILE, json.dumps({"files": rows}, indent=1) + "\n", keep_previous=False)
    except OSError:
        pass  # only a cache: the files are hashed again next time


def observe_node(
    node: Node,
    cluster: str,
    connect: Connect,
    ollama: OllamaConnect | None = None,
    *,
    spec: ClusterSpec | None = None,
    checks: FileChecks | None = None,
) -> NodeState:
    """`spec` (and `checks`): also read the sizes of the node's model sources and check its model files
    (`FileChecks`)."""
    state = _observe_docker(node, cluster, connect, spec, checks or FileChecks())
    if node.ollama is not None and ollama is not None:
        state = replace(state, ollama=observe_ollama(node, ollama))
    return state


def _unlabelled(inspect: Mapping[str, Any]) -> bool:
    return LABEL_CLUSTER not in ((inspect.get("Config") or {}).get("Labels") or {})


def foreign_container(inspect: Mapping[str, Any]) -> ForeignContainer:
    """An unlabelled container's name, host ports and (when it reads its model through a bind mount) that mount."""
    name = str(inspect.get("Name", "")).lstrip("/")
    model = parse_server_args(container_argv(inspect)).model
    mount = model_mount(inspect, model) if model is not None else None
    bind = mount.name if mount is not None and mount.kind == "bind" else None
    running = str((inspect.get("State") or {}).get("Status", "running")) == "running"
    return ForeignContainer(name, tuple(container_ports(inspect)), bind, running)


def _observe_docker(
    node: Node, cluster: str, connect: Connect, spec: ClusterSpec | None, checks: FileChecks
) -> NodeState:
    if node.docker is None:
        return NodeState(node=node.name)
    model_volume = node.llamacpp.volume if node.llamacpp is not None else None
    sources = _node_sources(spec, node.name) if spec is not None else []
    sizes: dict[str, int] = dict(checks.local_sizes)
    try:
        engine = connect(node)
        engine.ping()
        containers, foreign = engine.list_containers(cluster)
        volumes = engine.list_volumes(cluster)
        files: list[FileState] = []
        for v in volumes:
            # one helper run a volume; the model volume's also reads the sizes of the sources on the node
            found, on_node = engine.scan_files(v.name, sources if v.name == model_volume else ())
            sizes.update(on_node)
            files.extend(found)
        if spec is not None and checks.sha256_cache is not None:
            files = _check_sha256(engine, node.name, files, _expected(spec, node.name, sizes), checks.sha256_cache)
        services = [name for name in SERVICE_CONTAINERS if engine.service_status(name) is not None]
        unlabelled = [foreign_container(c) for c in engine.inspect_all() if _unlabelled(c)]
        volume_names = engine.volume_names()
        helper = node.llamacpp.helper_image if node.llamacpp is not None else None
        missing_helper = helper if helper is not None and not engine.image_exists(helper) else None
    except DriverError as exc:
        return NodeState(node=node.name, reachable=False, error=str(exc))
    return NodeState(
        node=node.name,
        volumes=tuple(sorted(volumes, key=lambda v: v.name)),
        files=tuple(sorted(files, key=lambda f: (f.volume, f.name))),
        containers=tuple(sorted(containers, key=lambda c: c.name)),
        foreign_containers=tuple(sorted(foreign)),
        foreign=tuple(sorted(unlabelled, key=lambda f: f.name)),
        volume_names=tuple(sorted(volume_names)),
        services=tuple(services),
        source_sizes=tuple(sorted(sizes.items())),
        missing_helper_image=missing_helper,
    )


def _check_sha256(
    engine: DockerNode,
    node: str,
    files: list[FileState],
    expected: Mapping[str, tuple[int | None, str]],
    cache: Mapping[tuple[str, str, str, int, int], str],
) -> list[FileState]:
    """Each file the spec gives a sha256 of whose size is right (or not known) gets its sha256: from the cache
    when its size and mtime are those it was hashed at, else hashed (one helper run a volume)."""
    out: list[FileState] = []
    todo: dict[str, list[str]] = {}
    for f in files:
        want = expected.get(f.name)
        if want is None or f.size is None or f.mtime is None or (want[0] is not None and want[0] != f.size):
            out.append(f)
            continue
        cached = cache.get((node, f.volume, f.name, f.size, f.mtime))
        if cached is not None:
            out.append(replace(f, sha256=cached))
        else:
            todo.setdefault(f.volume, []).append(f.name)
            out.append(f)
    if not todo:
        return out
    sums = {
        (volume, name): digest
        for volume, names in todo.items()
        for name, digest in engine.hash_files(volume, names).items()
    }
    return [replace(f, sha256=sums[f.volume, f.name]) if (f.volume, f.name) in sums else f for f in out]


def observe(
    spec: ClusterSpec, connect: Connect, ollama: OllamaConnect | None = None, *, state: Path | None = None
) -> ClusterState:
    """Every node of the spec, observed in parallel (Ollama servers too, when `ollama` is given), with the sizes
    of the model sources. With `state` (the state directory), model files the spec gives a sha256 of are checked
    too (hashed once, then cached there: `SHA256_CACHE_FILE`, written by `keep_sha256s` after an apply or a watch
    run, never while planning)."""
    nodes = spec.nodes
    cache = read_sha256_cache(state) if state is not None else None
    checks = FileChecks(local_source_sizes(spec), cache)
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(nodes)))) as pool:
        states = list(
            pool.map(lambda n: observe_node(n, spec.cluster.name, connect, ollama, spec=spec, checks=checks), nodes)
        )
    return ClusterState(cluster=spec.cluster.name, nodes={s.node: s for s in states})


def keep_sha256s(state: Path, observed: ClusterState) -> None:
    """Add the sha256s `observe` computed to the cache in the state directory (`SHA256_CACHE_FILE`)."""
    write_sha256_cache(state, read_sha256_cache(state), observed)
