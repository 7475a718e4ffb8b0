"""Spec + placement → desired state: volumes, model files and llama.cpp containers per node,
the Ollama models of each Ollama node, and the gateway config.

Pure: no I/O. Every replica the placement put on a node is rendered: a llama.cpp
container, or a derived Ollama model `homelab/<model>` made from the pulled base
tag with the placement's GPU layers (`num_gpu`) and the model's context (`num_ctx`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from controller.core.gateway_config import render_gateway
from controller.core.state import (
    GATEWAY_CONTAINER,
    LABEL_CLUSTER,
    LABEL_CONFIG,
    LABEL_HASH,
    LABEL_MODEL,
    LABEL_NODE,
    LABEL_POOL,
    LABEL_REPLICA,
    MODELS_MOUNT,
    OLLAMA_PREFIX,
    PRESET_PATH,
    ClusterState,
    ContainerConfig,
    ContainerState,
    FileState,
    NodeState,
    OllamaModelState,
    OllamaNodeState,
    PoolMember,
    VolumeState,
    health_url,
    ollama_tag,
    pool_container_name,
)
from solver.problem import Assignment, PlacementResult, Pool
from specs.enums import GpuAccess, Runtime
from specs.errors import HomelabError
from specs.model import ClusterSpec, Model, Node, gguf_file_name


class RenderError(HomelabError, ValueError):
    """The spec and placement cannot be turned into containers (one line, for the user)."""


GPU_RESTART_POLICY = "no"
CPU_RESTART_POLICY = "unless-stopped"


def gateway_here(spec: ClusterSpec, node: str) -> bool:
    """The spec runs the LiteLLM proxy as a container on `node`."""
    gw = spec.gateway
    return gw is not None and gw.mode == "container" and gw.node == node


def restart_policy(gpu_layers: int) -> str:
    """A container with layers on a GPU is never restarted by Docker itself: after a Docker restart or a
    reboot, Docker would start every such container at once, and CUDA initialisation of several at once
    deadlocks. homelab starts them (recovery, `watch`, `reconcile`), one at a time, each healthy before the
    next. CPU-only containers come back with Docker."""
    return GPU_RESTART_POLICY if gpu_layers > 0 else CPU_RESTART_POLICY


def container_name(model: str) -> str:
    """A name users can read: `homelab-qwen2.5-coder-7b`. Replicas of a model are on different nodes."""
    return f"homelab-{model}"


def file_name(source: str) -> str:
    """The file's name inside the volume: the source's base name (POSIX or Windows path)."""
    return gguf_file_name(source)


def model_file(model: Model) -> str:
    """The model's path inside the volume its container mounts: in the node's model volume, the source's base
    name; in a volume of the user's (`source.volume`), its path there."""
    assert model.source.gguf is not None
    return model.source.volume_path or file_name(model.source.gguf)


def llama_server_args(model: Model, node: Node, assignment: Assignment, port: int) -> tuple[str, ...]:
    """The llama-server command line for one replica, from its placement."""
    assert model.source.gguf is not None and node.llamacpp is not None
    rt = node.llamacpp
    args = [
        "-m",
        f"{MODELS_MOUNT}/{model_file(model)}",
        "--host",
        rt.bind_address,
        "--port",
        str(port),
        "-c",
        str(model.context),
        "-ngl",
        str(assignment.gpu_layers),
        "--alias",
        model.served_name,
        "-ctk",
        model.kv_cache.value,
        "-ctv",
        model.kv_cache.value,
        "-fa",
        "on" if model.flash_attn else "off",
    ]
    if model.parallel is not None:
        args += ["-np", str(model.parallel)]
    if rt.threads is not None:
        args += ["-t", str(rt.threads)]
    args += tensor_split_args(assignment)
    return (*args, *rt.server_args, *model.args)


def tensor_split_args(assignment: Assignment) -> list[str]:
    """`--split-mode layer --tensor-split N0,N1,…` for a replica split over several GPUs, else nothing.

    The proportions are the layers the placement gave each GPU (in GPU index order, the output layer
    counted on the last), as integers: llama.cpp assigns layer il of L+1 to the first GPU whose
    cumulative share exceeds il/(L+1), so integer layer counts reproduce them exactly
    (`solver.estimate.layer_devices`). Proportions of bytes would not: each GPU's bytes include its
    compute buffer and overhead, which are not layers.
    """
    gpus = sorted(assignment.vram_bytes)
    if len(gpus) <= 1:
        return []
    if sorted(assignment.layers_per_gpu) != gpus or sum(assignment.layers_per_gpu.values()) != assignment.gpu_layers:
        raise RenderError(
            f"model '{assignment.model}': placed on GPUs {gpus} without its layers per GPU"
            " (cannot render --tensor-split)"
        )
    return ["--split-mode", "layer", "--tensor-split", ",".join(str(assignment.layers_per_gpu[g]) for g in gpus)]


# --------------------------------------------------------------------------- swap pools
#
# One llama-server in router mode per pool (`--models-preset`, `--models-max`): each member is a section of
# the preset with its own arguments; a request naming a member's alias starts a child llama-server for it,
# and with `--models-max` members loaded the least recently used one is unloaded first. A member idle for its
# `ttl` is put to sleep by its own child (`sleep-idle-seconds`: weights and KV cache freed, the process kept
# and still counted in `--models-max`). Arguments on the router's command line apply to every member and win
# over the preset, so only the node's `server_args` go there.


def pool_members(placement: PlacementResult, pool: Pool) -> list[Assignment]:
    """The on-demand assignments in `pool`, by model name."""
    return sorted(
        (
            a
            for a in placement.assignments
            if a.on_demand
            and a.node == pool.node
            and (a.gpus[0] if a.gpus else None) == pool.gpu
            and a.model in pool.members
        ),
        key=lambda a: a.model,
    )


def args_to_ini(args: list[str] | tuple[str, ...], what: str) -> list[tuple[str, str]]:
    """llama-server arguments as preset keys: `--flag value` → `flag = value`, a lone `--flag` → `flag = true`.

    llama-server's preset takes every option by its name without dashes (short names too: `b = 256` is
    `--batch-size 256`), and booleans as true/false (`no-mmap = true`).
    """
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("-") or tok in ("-", "--"):
            raise RenderError(f"{what}: '{tok}' is not an option (a swap pool's preset needs `--flag [value]`)")
        key, eq, value = tok.lstrip("-").partition("=")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is not None and not (nxt.startswith("-") and not _numeric(nxt)):
                value = nxt
                i += 1
            else:
                value = "true"
        out.append((key, value))
        i += 1
    return out


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def preset_ini(spec: ClusterSpec, node: Node, members: list[Assignment], files_of: Mapping[str, str]) -> str:
    """The pool's `--models-preset` text: a `[*]` section for every member (threads), then one section per
    member, named by its alias, with its own file, context, GPU layers, KV cache type and idle time."""
    rt = node.llamacpp
    assert rt is not None
    lines = ["# Written by homelab: one section per on-demand model of this swap pool.", "[*]"]
    if rt.threads is not None:
        lines.append(f"threads = {rt.threads}")
    for a in members:
        model = spec.model(a.model)
        alias = model.served_name
        if any(ch in alias for ch in "[]\n=;#"):
            raise RenderError(f"model '{model.name}': alias '{alias}' cannot name a preset section")
        keys: list[tuple[str, str]] = [
            ("model", f"{MODELS_MOUNT}/{files_of[a.model]}"),
            ("ctx-size", str(model.context)),
            ("n-gpu-layers", str(a.gpu_layers)),
            ("cache-type-k", model.kv_cache.value),
            ("cache-type-v", model.kv_cache.value),
            ("flash-attn", "on" if model.flash_attn else "off"),
            ("sleep-idle-seconds", str(max(1, round(model.idle_ttl)))),
        ]
        if model.parallel is not None:
            keys.append(("parallel", str(model.parallel)))
        keys += args_to_ini(model.args, f"model '{model.name}': args")
        lines += ["", f"[{alias}]", *(f"{k} = {v}" for k, v in keys)]
    return "\n".join(lines) + "\n"


def render_pool(
    spec: ClusterSpec, node: Node, pool: Pool, members: list[Assignment], files_of: Mapping[str, str], port: int
) -> ContainerState:
    """A swap pool's router container: llama-server in router mode on one port, its members in the preset."""
    rt = node.llamacpp
    assert rt is not None and node.docker is not None
    gpu_layers = max((a.gpu_layers for a in members), default=0)
    access = node.docker.gpu_access
    gpus = (pool.gpu,) if pool.gpu is not None and gpu_layers > 0 and access is not GpuAccess.NONE else ()
    command = (
        "--models-preset",
        PRESET_PATH,
        "--models-max",
        str(pool.max_loaded),
        "--host",
        rt.bind_address,
        "--port",
        str(port),
        *rt.server_args,
    )
    config = ContainerConfig(
        image=rt.image,
        command=command,
        model_file="",
        context=0,
        gpu_layers=gpu_layers,
        port=port,
        alias="",
        cache_type="",
        gpus=gpus,
        gpu_access=access.value if gpus else GpuAccess.NONE.value,
        volume=rt.volume,
        restart_policy=restart_policy(gpu_layers),
        members=tuple(
            PoolMember(
                model=a.model,
                alias=spec.model(a.model).served_name,
                model_file=files_of[a.model],
                context=spec.model(a.model).context,
                gpu_layers=a.gpu_layers,
                cache_type=spec.model(a.model).kv_cache.value,
                ttl=spec.model(a.model).idle_ttl,
            )
            for a in members
        ),
        preset=preset_ini(spec, node, members, files_of),
    )
    digest = config.digest()
    labels = {
        LABEL_CLUSTER: spec.cluster.name,
        LABEL_NODE: node.name,
        LABEL_MODEL: "",
        LABEL_POOL: pool.key,
        LABEL_REPLICA: "0",
        LABEL_HASH: digest,
        LABEL_CONFIG: json.dumps(config.to_json(), sort_keys=True, separators=(",", ":")),
    }
    return ContainerState(
        name=pool_container_name(pool.key),
        node=node.name,
        model="",
        replica=0,
        config=config,
        config_hash=digest,
        health_url=health_url(node.address, port),
        labels=labels,
    )


def _ports(
    spec: ClusterSpec, placement: PlacementResult, current_ports: Mapping[tuple[str, str], int]
) -> dict[tuple[str, str], int]:
    """A port for every llama.cpp container ((node, container name) → port): a model's fixed port, else the one
    the container has now, else the lowest free. A swap pool's router takes one port for all its members.

    Every container that keeps its current port is given it before any new one is given a port: a new
    container (or one whose port is taken by a fixed port) takes the lowest port nobody keeps, so adding a
    model whose name sorts first moves no running container (issue 28, item 1)."""
    out: dict[tuple[str, str], int] = {}
    taken: dict[str, set[int]] = {}
    wanted: list[tuple[str, str]] = []
    for a in placement.assignments:
        model = spec.model(a.model)
        if model.runtime is not Runtime.LLAMACPP or a.on_demand:
            continue
        wanted.append((a.node, container_name(a.model)))
        if model.port is not None:
            out[a.node, container_name(a.model)] = model.port
            taken.setdefault(a.node, set()).add(model.port)
    wanted += [(p.node, pool_container_name(p.key)) for p in placement.pools if p.runtime is Runtime.LLAMACPP]
    new: list[tuple[str, str]] = []
    for node_name, cname in sorted(wanted):
        if (node_name, cname) in out:
            continue
        rt = spec.node(node_name).llamacpp
        assert rt is not None
        used = taken.setdefault(node_name, set())
        now = current_ports.get((node_name, cname))
        if now is not None and now in rt.ports and now not in used:
            used.add(now)
            out[node_name, cname] = now
        else:
            new.append((node_name, cname))
    for node_name, cname in new:
        rt = spec.node(node_name).llamacpp
        assert rt is not None
        used = taken.setdefault(node_name, set())
        port = next((p for p in range(rt.ports.start, rt.ports.end + 1) if p not in used), -1)
        if port < 0:
            raise RenderError(f"node '{node_name}' has no free port left in {rt.ports.start}-{rt.ports.end}")
        used.add(port)
        out[node_name, cname] = port
    return out


def render(
    spec: ClusterSpec,
    placement: PlacementResult,
    current_ports: Mapping[tuple[str, str], int] | None = None,
    source_sizes: Mapping[tuple[str, str], int] | None = None,
) -> ClusterState:
    """The desired state of every node. `current_ports` ((node, container) → port) keeps ports stable;
    `source_sizes` ((node, GGUF path) → bytes, `source_sizes(observed)`) gives each copied file its source's
    size, so that a file of another size in the volume is planned to be copied again."""
    sizes = source_sizes or {}
    ports = _ports(spec, placement, current_ports or {})
    volumes: dict[str, list[VolumeState]] = {n.name: [] for n in spec.nodes}
    files: dict[str, dict[str, FileState]] = {n.name: {} for n in spec.nodes}
    containers: dict[str, list[ContainerState]] = {n.name: [] for n in spec.nodes}

    def want_file(model: Model, node: Node, *, copy: bool = False) -> tuple[str, str]:
        """The model's GGUF on the node: (its path inside the volume the container mounts, that volume).
        A file in a volume of the user's (`source.volume`) is read where it is: that volume is mounted as it
        is, never created, labelled or copied into — unless `copy` (a swap pool mounts one volume for all its
        members). Any other file is copied into the node's model volume (which is then wanted too)."""
        rt = node.llamacpp
        assert rt is not None and model.source.gguf is not None
        if model.source.node is not None and model.source.node != node.name:
            raise RenderError(
                f"model '{model.name}': its file is on node '{model.source.node}' but it is placed on"
                f" '{node.name}'; copies between nodes are not supported: pin it with placement.node"
            )
        if model.source.volume is not None and not copy:
            return model_file(model), model.source.volume
        name = file_name(model.source.gguf)
        if not any(v.name == rt.volume for v in volumes[node.name]):
            volumes[node.name].append(VolumeState(node.name, rt.volume))
        known = files[node.name].get(name)
        if known is not None and known.source != model.source.gguf:
            raise RenderError(
                f"node '{node.name}': two different model files are both named '{name}'"
                f" ({known.source} and {model.source.gguf})"
            )
        files[node.name][name] = FileState(
            node.name,
            rt.volume,
            name,
            size=sizes.get((node.name, model.source.gguf)),
            sha256=model.source.sha256,
            source=model.source.gguf,
        )
        return name, rt.volume

    for a in sorted(placement.assignments, key=lambda a: (a.node, a.model, a.replica)):
        model = spec.model(a.model)
        if model.runtime is not Runtime.LLAMACPP or a.on_demand:
            continue
        node = spec.node(a.node)
        rt = node.llamacpp
        assert rt is not None and model.source.gguf is not None and node.docker is not None
        name, volume = want_file(model, node)
        port = ports[node.name, container_name(model.name)]
        access = node.docker.gpu_access
        gpus = tuple(sorted(a.vram_bytes)) if a.gpu_layers > 0 and access is not GpuAccess.NONE else ()
        config = ContainerConfig(
            image=rt.image,
            command=llama_server_args(model, node, a, port),
            model_file=name,
            context=model.context,
            gpu_layers=a.gpu_layers,
            port=port,
            alias=model.served_name,
            cache_type=model.kv_cache.value,
            gpus=gpus,
            gpu_access=access.value if gpus else GpuAccess.NONE.value,
            volume=volume,
            restart_policy=restart_policy(a.gpu_layers),
        )
        digest = config.digest()
        labels = {
            LABEL_CLUSTER: spec.cluster.name,
            LABEL_NODE: node.name,
            LABEL_MODEL: model.name,
            LABEL_REPLICA: str(a.replica),
            LABEL_HASH: digest,
            LABEL_CONFIG: json.dumps(config.to_json(), sort_keys=True, separators=(",", ":")),
        }
        containers[node.name].append(
            ContainerState(
                name=container_name(model.name),
                node=node.name,
                model=model.name,
                replica=a.replica,
                config=config,
                config_hash=digest,
                health_url=health_url(node.address, port),
                labels=labels,
            )
        )
    for pool in placement.pools:
        if pool.runtime is not Runtime.LLAMACPP:
            continue
        node = spec.node(pool.node)
        members = pool_members(placement, pool)
        files_of = {a.model: want_file(spec.model(a.model), node, copy=True)[0] for a in members}
        port = ports[node.name, pool_container_name(pool.key)]
        containers[node.name].append(render_pool(spec, node, pool, members, files_of, port))
    containers = {n: sorted(cs, key=lambda c: c.name) for n, cs in containers.items()}
    spec_files = tuple(
        sorted(
            {
                file_name(m.source.gguf)
                for m in spec.models
                if m.runtime is Runtime.LLAMACPP and m.source.gguf and m.source.volume is None
            }
        )
    )
    nodes = {
        n.name: NodeState(
            node=n.name,
            volumes=tuple(volumes[n.name]),
            files=tuple(files[n.name].values()),
            containers=tuple(containers[n.name]),
            ollama=render_ollama(spec, n, placement),
            model_volume=n.llamacpp.volume if n.llamacpp is not None else None,
            services=(GATEWAY_CONTAINER,) if gateway_here(spec, n.name) else (),
            adopts=tuple(
                (c.name, spec.model(c.model).adopt or "")
                for c in containers[n.name]
                if not c.pool and spec.model(c.model).adopt
            ),
            spec_files=spec_files,
        )
        for n in spec.nodes
    }
    return ClusterState(cluster=spec.cluster.name, nodes=nodes, gateway=render_gateway(spec, nodes))


def source_sizes(observed: ClusterState) -> dict[tuple[str, str], int]:
    """(node, GGUF path) → bytes, as observed (`NodeState.source_sizes`): what `render` gives the desired files."""
    return {(n.node, path): size for n in observed.nodes.values() for path, size in n.source_sizes}


def derived_name(model: str) -> str:
    """The derived Ollama model homelab creates for a spec model: `homelab/<model>:latest`."""
    return ollama_tag(OLLAMA_PREFIX + model)


def render_ollama(spec: ClusterSpec, node: Node, placement: PlacementResult) -> OllamaNodeState | None:
    """A node's Ollama: base tags pulled, one derived model per placed replica with its num_gpu and num_ctx.
    Ollama loads and unloads models itself: an on-demand one is a derived model like any other, not preloaded."""
    rt = node.ollama
    if rt is None:
        return None
    models: list[OllamaModelState] = []
    for a in sorted(placement.assignments, key=lambda a: a.model):
        model = spec.model(a.model)
        if a.node != node.name or model.runtime is not Runtime.OLLAMA:
            continue
        assert model.source.ollama is not None
        models.append(
            OllamaModelState(
                node=node.name,
                name=derived_name(model.name),
                model=model.name,
                base=ollama_tag(model.source.ollama),
                num_gpu=a.gpu_layers,
                num_ctx=model.context,
                preload=model.preload,
                # an on-demand model is never preloaded: it loads on request and stays `ttl` after the last
                # (the gateway sends that keep_alive with each request: `gateway_config`)
                keep_alive=model.idle_ttl if model.on_demand else rt.keep_alive if model.preload else None,
            )
        )
    return OllamaNodeState(
        url=rt.url,
        tags=tuple(sorted({m.base for m in models})),
        models=tuple(models),
        prune=rt.prune,
    )


def ollama_requirements(spec: ClusterSpec, placement: PlacementResult) -> list[str]:
    """What each Ollama node with on-demand models must be set to: homelab does not run Ollama, so it says.

    Ollama keeps at most OLLAMA_MAX_LOADED_MODELS models loaded (its default: 3 per GPU, 3 on a CPU) and
    unloads the least recently used one to load another. The plan counts every pinned model placed on the
    node plus the server's `max_loaded` (per server, not per pool: the setting is server-wide, so a node with
    two GPU pools still loads at most `max_loaded` on-demand models at once; never more than it has): with
    fewer, Ollama would unload a pinned model for an on-demand one (or refuse to hold as many as the spec
    allows). Ollama's API does not report the setting, so it cannot be compared with what the node runs.
    """
    out: list[str] = []
    for node in spec.nodes:
        if node.ollama is None:
            continue
        pools = [p for p in placement.pools if p.node == node.name and p.runtime is Runtime.OLLAMA]
        if not pools:
            continue
        pinned = sum(
            1
            for a in placement.assignments
            if a.node == node.name and not a.on_demand and spec.model(a.model).runtime is Runtime.OLLAMA
        )
        members = sum(len(p.members) for p in pools)
        swap = min(node.ollama.max_loaded, members)
        out.append(
            f"node {node.name}: Ollama must run with OLLAMA_MAX_LOADED_MODELS={pinned + swap} ({pinned} pinned"
            f" + {swap} loaded at once from {members} on-demand models in {len(pools)} pool(s));"
            " Ollama's API does not say what it is set to"
        )
    return out
