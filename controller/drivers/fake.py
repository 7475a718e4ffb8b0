"""An in-memory Docker engine for tests of the engine (the shipped fake, httpx-style).

It keeps the DockerNode contract — labels, refusal to touch unlabelled
containers, atomic file copies — and records every call in `calls`, so tests can
check order. It is a test double, not a Docker emulator: nothing runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from controller.core.state import (
    ADOPTED_SUFFIX,
    LABEL_CLUSTER,
    LABEL_WRITES,
    ContainerState,
    FileState,
    ServiceContainer,
    VolumeState,
)
from controller.drivers.base import DriverError, NodeUnreachable, NotManaged, ProgressFn, VerifyFailed


@dataclass
class FakeDockerNode:
    node: str
    cluster: str = "lab"
    images: set[str] = field(default_factory=set)
    helper_image: str | None = "busybox:latest"
    """The helper image on the node besides `images` (the default `llamacpp.helper_image`; None: not there)."""
    source_files: dict[str, int] = field(default_factory=dict)
    """Files on the node's disk: path → size."""
    reachable: bool = True
    containers: dict[str, ContainerState] = field(default_factory=dict)
    foreign: set[str] = field(default_factory=set)
    inspected: dict[str, dict[str, Any]] = field(default_factory=dict)
    """`docker inspect` of unlabelled containers (name → dict); each is foreign too."""
    volumes: dict[str, dict[str, int]] = field(default_factory=dict)
    """volume → {file name: size}."""
    user_volumes: set[str] = field(default_factory=set)
    """Volumes without homelab's labels (models read in place, `source.volume`)."""
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail_on: set[tuple[str, str]] = field(default_factory=set)
    """(method, name) pairs that raise DriverError."""
    pids: dict[str, set[int]] = field(default_factory=dict)
    """container name → its host PIDs (for matching nvidia-smi's processes)."""
    memory: dict[str, int] = field(default_factory=dict)
    """container name → the host memory `docker stats` would report for it (bytes; absent: no figure)."""
    text_volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    """Volumes of text files (the gateway's config): volume → {file name: text}; not model volumes."""
    services: dict[str, tuple[ServiceContainer, str, dict[str, str]]] = field(default_factory=dict)
    """Service containers (the gateway): name → (how it runs, Docker status, its environment)."""
    pool_children: dict[str, dict[str, float]] = field(default_factory=dict)
    """A swap pool's container name → {member alias: seconds since its process started}."""
    hashes: dict[tuple[str, str], str] = field(default_factory=dict)
    """(volume, file name) → the sha256 its content has (a copy with a checksum sets it; absent: `"0" * 64`)."""
    helpers: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    """Helper containers left on the node: name → (Docker status, labels). A copy stops those that write its
    target (`homelab.writes=VOLUME/NAME`); `clean_helpers` removes the finished ones and every writer."""
    mtimes: dict[tuple[str, str], int] = field(default_factory=dict)
    """(volume, file name) → its modification time (each copy moves it on; absent: 0)."""

    def _check(self, method: str, name: str) -> None:
        if not self.reachable:
            raise NodeUnreachable(f"{self.node}: connection refused")
        self.calls.append((method, name))
        if (method, name) in self.fail_on:
            raise DriverError(f"{method} {name} failed (injected)")

    def ping(self) -> None:
        self._check("ping", "")

    def image_exists(self, image: str) -> bool:
        return image in self.images or image == self.helper_image

    def list_containers(self, cluster: str) -> tuple[list[ContainerState], list[str]]:
        self._check("list_containers", cluster)
        return list(self.containers.values()), sorted(self.foreign | set(self.inspected))

    def inspect_all(self) -> list[dict[str, Any]]:
        self._check("inspect_all", "")
        managed = [
            {"Name": "/" + c.name, "Config": {"Labels": dict(c.labels)}, "HostConfig": {"NetworkMode": "host"}}
            for c in self.containers.values()
        ]
        return managed + [dict(v) for v in self.inspected.values()]

    def list_volumes(self, cluster: str) -> list[VolumeState]:
        self._check("list_volumes", cluster)
        return [VolumeState(self.node, v) for v in self.volumes]

    def volume_names(self) -> list[str]:
        self._check("volume_names", "")
        return sorted(set(self.volumes) | self.user_volumes)

    def list_files(self, volume: str) -> list[FileState]:
        self._check("list_files", volume)
        return self._files(volume)

    def _files(self, volume: str) -> list[FileState]:
        return [
            FileState(self.node, volume, n, size, mtime=self.mtimes.get((volume, n), 0))
            for n, size in self.volumes.get(volume, {}).items()
            if not n.startswith(".")  # partial copies are never model files
        ]

    def scan_files(self, volume: str, sources: Sequence[str] = ()) -> tuple[list[FileState], dict[str, int]]:
        self._check("scan_files", volume)
        return self._files(volume), {p: self.source_files[p] for p in sources if p in self.source_files}

    def hash_files(self, volume: str, names: Sequence[str]) -> dict[str, str]:
        self._check("hash_files", volume)
        files = self.volumes.get(volume, {})
        return {n: self.hashes.get((volume, n), "0" * 64) for n in names if n in files}

    def create_volume(self, name: str, labels: dict[str, str]) -> None:
        self._check("create_volume", name)
        self.volumes.setdefault(name, {})

    def copy_file(
        self, volume: str, source: str, name: str, *, sha256: str | None = None, progress: ProgressFn | None = None
    ) -> int:
        self._check("copy_file", name)
        self._stop_writers(volume, name)
        if source not in self.source_files:
            raise DriverError(f"{source}: no such file on node {self.node}")
        if volume not in self.volumes:
            raise DriverError(f"volume {volume} does not exist")
        if sha256 == "0" * 64:
            raise VerifyFailed(f"{name}: checksum mismatch")
        size = self.source_files[source]
        if progress is not None:
            progress(size, size)
        self.volumes[volume][name] = size
        self.mtimes[volume, name] = self.mtimes.get((volume, name), 0) + 1
        if sha256 is not None:
            self.hashes[volume, name] = sha256.lower()
        else:
            self.hashes.pop((volume, name), None)
        return size

    def remove_file(self, volume: str, name: str) -> None:
        self._check("remove_file", name)
        self._stop_writers(volume, name)
        self.volumes.get(volume, {}).pop(name, None)

    def _stop_writers(self, volume: str, name: str) -> None:
        """As the real driver: a helper writing VOLUME/NAME is stopped and removed, its partial copies with it."""
        for helper, (_, labels) in list(self.helpers.items()):
            if labels.get(LABEL_WRITES) == f"{volume}/{name}":
                del self.helpers[helper]
        files = self.volumes.get(volume, {})
        for other in [n for n in files if n.startswith(f".{name}.") and n.endswith(".partial")]:
            del files[other]

    def clean_helpers(self) -> list[str]:
        self._check("clean_helpers", "")
        gone = [
            name
            for name, (status, labels) in self.helpers.items()
            if LABEL_WRITES in labels or status in ("exited", "dead")
        ]
        for name in gone:
            del self.helpers[name]
        return sorted(gone)

    def run_container(self, desired: ContainerState) -> None:
        self._check("run_container", desired.name)
        assert desired.config is not None
        if desired.config.image not in self.images:
            raise DriverError(f"image {desired.config.image} is not on node {self.node}")
        if desired.name in self.containers or desired.name in self.foreign or desired.name in self.inspected:
            raise DriverError(f"container {desired.name} already exists")
        self.containers[desired.name] = replace(desired, status="running", exit_code=None)

    def start_container(self, name: str) -> None:
        self._check("start_container", name)
        if name in self.foreign:
            raise NotManaged(f"container {name} has no {LABEL_CLUSTER} label: not homelab's")
        self.containers[name] = replace(self.containers[name], status="running", exit_code=None)

    def set_aside(self, name: str, *, timeout: float = 5.0) -> str:
        self._check("set_aside", name)
        if name not in self.inspected:
            raise DriverError(f"no container {name} on node {self.node}")
        if LABEL_CLUSTER in ((self.inspected[name].get("Config") or {}).get("Labels") or {}):
            raise NotManaged(f"container {name} on node {self.node} is homelab's already; not adopting it")
        new = f"{name}{ADOPTED_SUFFIX}"
        n = 2
        while new in self.inspected or new in self.containers:
            new, n = f"{name}{ADOPTED_SUFFIX}-{n}", n + 1
        old = self.inspected.pop(name)
        self.foreign.discard(name)
        host = {**(old.get("HostConfig") or {}), "RestartPolicy": {"Name": "no"}}
        self.inspected[new] = {**old, "Name": f"/{new}", "State": {"Status": "exited"}, "HostConfig": host}
        return new

    def stop_container(self, name: str, *, timeout: float = 5.0) -> None:
        self._check("stop_container", name)
        if name in self.foreign or name in self.inspected:
            raise NotManaged(f"container {name} has no {LABEL_CLUSTER} label: not homelab's")
        if name in self.containers and self.containers[name].status == "running":
            self.containers[name] = replace(self.containers[name], status="exited", exit_code=143)

    def remove_container(self, name: str, *, timeout: float = 5.0, adopt: bool = False) -> None:
        self._check("remove_container", name)
        if adopt and name in self.inspected:
            del self.inspected[name]
            self.foreign.discard(name)
            return
        if name in self.foreign or name in self.inspected:
            raise NotManaged(f"container {name} has no {LABEL_CLUSTER} label: not homelab's")
        self.containers.pop(name, None)
        self.services.pop(name, None)

    def container_logs(self, name: str, tail: int = 20) -> str:
        return ""

    def read_volume_files(self, volume: str, names: Sequence[str]) -> dict[str, str | None]:
        self._check("read_volume_files", volume)
        files = self.text_volumes.get(volume, {})
        return {n: files.get(n) for n in names}

    def write_volume_files(self, volume: str, files: Sequence[tuple[str, str]], labels: dict[str, str]) -> None:
        self._check("write_volume_files", volume)
        if not labels.get(LABEL_CLUSTER):
            raise DriverError(f"refusing to create volume {volume} without the {LABEL_CLUSTER} label")
        stored = self.text_volumes.setdefault(volume, {})
        for name, text in files:
            if name in stored:
                stored[name + ".bak"] = stored[name]
            stored[name] = text

    def run_service(self, desired: ServiceContainer, env: Mapping[str, str]) -> None:
        self._check("run_service", desired.name)
        if desired.name in self.foreign:
            raise NotManaged(f"container {desired.name} has no {LABEL_CLUSTER} label: not homelab's")
        if desired.image not in self.images:
            raise DriverError(f"image {desired.image} is not on node {self.node}")
        self.services[desired.name] = (desired, "running", dict(env))

    def service_status(self, name: str) -> tuple[str, str] | None:
        self._check("service_status", name)
        if name in self.foreign:
            raise NotManaged(f"container {name} has no {LABEL_CLUSTER} label: not homelab's")
        got = self.services.get(name)
        return (got[1], got[0].config_hash) if got is not None else None

    def container_pids(self, name: str) -> set[int]:
        if not self.reachable:
            raise NodeUnreachable(f"{self.node}: connection refused")
        return set(self.pids.get(name, ()))  # not recorded in `calls`: observing, not acting

    def pool_processes(self, name: str) -> dict[str, float]:
        if not self.reachable:
            raise NodeUnreachable(f"{self.node}: connection refused")
        c = self.containers.get(name)
        if c is None or c.status != "running":
            return {}
        return dict(self.pool_children.get(name, {}))  # not recorded in `calls`: observing, not acting

    def container_memory(self, name: str) -> int | None:
        if not self.reachable:
            raise NodeUnreachable(f"{self.node}: connection refused")
        c = self.containers.get(name)
        if c is None or c.status != "running":
            return None
        return self.memory.get(name)  # not recorded in `calls`: observing, not acting
