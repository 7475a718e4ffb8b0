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
    LABEL_REPLICA,
    MODELS_MOUNT,
    OLLAMA_PREFIX,
    ClusterState,
    ContainerConfig,
    ContainerState,
    FileState,
    NodeState,
    OllamaModelState,
    OllamaNodeState,
    VolumeState,
    health_url,
    ollama_tag,
)
from solver.problem import Assignment, PlacementResult
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


def _ports(
    spec: ClusterSpec, placement: PlacementResult, current_ports: Mapping[tuple[str, str], int]
) -> dict[tuple[str, str], int]:
    """A port for every llama.cpp replica: its fixed port, else the one it has now, else the lowest free."""
    out: dict[tuple[str, str], int] = {}
    taken: dict[str, set[int]] = {}
    llama = [a for a in placement.assignments if spec.model(a.model).runtime is Runtime.LLAMACPP]
    for a in llama:
        fixed = spec.model(a.model).port
        if fixed is not None:
            out[a.node, a.model] = fixed
            taken.setdefault(a.node, set()).add(fixed)
    for a in sorted(llama, key=lambda a: (a.node, a.model)):
        if (a.node, a.model) in out:
            continue
        rt = spec.node(a.node).llamacpp
        assert rt is not None
        used = taken.setdefault(a.node, set())
        now = current_ports.get((a.node, container_name(a.model)))
        if now is not None and now in rt.ports and now not in used:
            port = now
        else:
            free = (p for p in range(rt.ports.start, rt.ports.end + 1) if p not in used)
            port = next(free, -1)
            if port < 0:
                raise RenderError(f"node '{a.node}' has no free port left in {rt.ports.start}-{rt.ports.end}")
        used.add(port)
        out[a.node, a.model] = port
    return out


def render(
    spec: ClusterSpec,
    placement: PlacementResult,
    current_ports: Mapping[tuple[str, str], int] | None = None,
) -> ClusterState:
    """The desired state of every node. `current_ports` ((node, container) → port) keeps ports stable."""
    ports = _ports(spec, placement, current_ports or {})
    volumes: dict[str, list[VolumeState]] = {n.name: [] for n in spec.nodes}
    files: dict[str, dict[str, FileState]] = {n.name: {} for n in spec.nodes}
    containers: dict[str, list[ContainerState]] = {n.name: [] for n in spec.nodes}
    for a in sorted(placement.assignments, key=lambda a: (a.node, a.model, a.replica)):
        model = spec.model(a.model)
        if model.runtime is not Runtime.LLAMACPP:
            continue
        node = spec.node(a.node)
        rt = node.llamacpp
        assert rt is not None and model.source.gguf is not None and node.docker is not None
        if model.source.node is not None and model.source.node != node.name:
            raise RenderError(
                f"model '{model.name}': its file is on node '{model.source.node}' but it is placed on"
                f" '{node.name}'; copies between nodes are not supported: pin it with placement.node"
            )
        name = model_file(model)
        # A file in a volume of the user's (`source.volume`) is read where it is: that volume is mounted as it
        # is, never created, labelled or copied into. Any other file is copied into the node's model volume.
        volume = model.source.volume or rt.volume
        if model.source.volume is None:
            if not any(v.name == rt.volume for v in volumes[node.name]):
                volumes[node.name].append(VolumeState(node.name, rt.volume))
            known = files[node.name].get(name)
            if known is not None and known.source != model.source.gguf:
                raise RenderError(
                    f"node '{node.name}': two different model files are both named '{name}'"
                    f" ({known.source} and {model.source.gguf})"
                )
            files[node.name][name] = FileState(
                node.name, rt.volume, name, sha256=model.source.sha256, source=model.source.gguf
            )
        port = ports[node.name, model.name]
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
                (c.name, spec.model(c.model).adopt or "") for c in containers[n.name] if spec.model(c.model).adopt
            ),
            spec_files=spec_files,
        )
        for n in spec.nodes
    }
    return ClusterState(cluster=spec.cluster.name, nodes=nodes, gateway=render_gateway(spec, nodes))


def derived_name(model: str) -> str:
    """The derived Ollama model homelab creates for a spec model: `homelab/<model>:latest`."""
    return ollama_tag(OLLAMA_PREFIX + model)


def render_ollama(spec: ClusterSpec, node: Node, placement: PlacementResult) -> OllamaNodeState | None:
    """A node's Ollama: base tags pulled, one derived model per placed replica with its num_gpu and num_ctx."""
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
                keep_alive=rt.keep_alive if model.preload else None,
            )
        )
    return OllamaNodeState(
        url=rt.url,
        tags=tuple(sorted({m.base for m in models})),
        models=tuple(models),
        prune=rt.prune,
    )
