"""One node's Docker engine, through the docker SDK (`unix://`, `tcp://` and `ssh://` endpoints).

`DockerEngine` implements `controller.drivers.base.DockerNode`. Rules it keeps:

- **Never pull.** Every image is looked up with `images.get()` first; a missing
  one is a `DriverError` ("image X is not on node Y; load it there first"),
  because `containers.run` on a missing image would try a pull.
- **Never touch what is not ours.** Containers without the `homelab.cluster`
  label are reported by name as foreign and refused (`NotManaged`) by
  `start_container` and `remove_container`; so are containers of another cluster.
- **One-line errors.** A daemon that does not answer raises `NodeUnreachable`
  with the reason (no such socket, connection refused, timed out, ssh failed);
  anything else Docker refuses raises `DriverError` with Docker's explanation.
- **Files by helper containers.** Reading and copying model files happens in a
  short-lived container of the node's `llamacpp.helper_image` (a busybox-like
  image with `sh`, `stat`, `cp`, `mv`, `sha256sum`), with no network, removed
  afterwards. A copy goes to `/models/.NAME.partial`, is checked (size, and
  sha256 when given) and renamed to `/models/NAME` in the same volume, so a
  half-copied file never appears under its name. Each copy writes its own
  `/models/.NAME.TOKEN.partial`. Names starting with `.` are never model files:
  `list_files` ignores them.
- **Orphaned helpers are stopped.** A helper that writes carries
  `homelab.writes=VOLUME/NAME` (or `VOLUME`). A killed apply (kill -9) leaves its
  copy running: before NAME is copied again, every helper of this cluster that
  writes VOLUME/NAME is stopped and removed, and so are the partial copies of NAME
  it left; at the start of each apply `clean_helpers` removes this cluster's
  finished helpers and every one that writes (only an apply writes, and it holds
  the lock).

- **ssh:// with the node's own SSH settings.** The SDK talks to a private local
  socket piped through `ssh … HOST docker system dial-stdio` with the spec's
  `ssh.key_file` and `ssh.known_hosts`, strict host key checking and no prompts
  (drivers/sshdocker.py); docker-py's own ssh support cannot name either file.

Helper containers carry `homelab.cluster` and `homelab.role=helper`; they are
neither managed containers nor foreign ones for `list_containers`.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import posixpath
import re
import socket
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any

from specs.lazy import LazyModule

if TYPE_CHECKING:
    import docker
    import docker.constants
    import docker.errors
    import docker.types
else:  # Docker's SDK (and paramiko under it) only when a command talks to an engine
    docker = LazyModule("docker", "docker.constants", "docker.errors", "docker.types")

from controller.core.state import (
    ADOPTED_SUFFIX,
    LABEL_CLUSTER,
    LABEL_CONFIG,
    LABEL_HASH,
    LABEL_MODEL,
    LABEL_NODE,
    LABEL_REPLICA,
    LABEL_ROLE,
    LABEL_WRITES,
    MODELS_MOUNT,
    PRESET_PATH,
    ContainerConfig,
    ContainerState,
    FileState,
    ServiceContainer,
    VolumeState,
    health_url,
)
from controller.drivers.base import DriverError, NodeUnreachable, NotManaged, ProgressFn, VerifyFailed
from controller.drivers.sshdocker import DialStdioProxy, ssh_argv
from specs.model import Node

# LABEL_ROLE (controller.core.state): `helper` on the short-lived containers that read and copy model files;
# `gateway` on the LiteLLM proxy's container and its volume (`run_service`, `write_volume_files`). A container
# or volume with a role is neither a model server (or model volume) nor foreign.
HELPER_ROLE = "helper"
DATA_MOUNT = "/data"
SRC_MOUNT = "/src"
PARTIAL_SUFFIX = ".partial"
POLL_INTERVAL_S = 0.5
STALE_HELPER_S = 3600.0
"""A helper created but never started this long ago was left by a killed homelab (a reader's is removed at once)."""
MAX_SYMLINK_HOPS = 8

# Exit codes of the helper scripts.
_EXIT_NO_SOURCE = 3
_EXIT_SIZE = 4
_EXIT_SHA = 5
_EXIT_SYMLINK = 7

# The volume's files as `f SIZE MTIME/NAME\0`, then each source (`$2…`: /src/I/NAME, the directory of source I
# mounted at /src/I) that is a regular file, not a link, as `s SIZE/I\0`.
_LIST_SCRIPT = r"""
cd "$1" || exit 3
for f in * .[!.]* ..?*; do
  [ -f "$f" ] && [ ! -L "$f" ] || continue
  printf 'f %s/%s\0' "$(stat -c '%s %Y' "$f")" "$f"
done
shift
i=0
for p in "$@"; do
  [ -f "$p" ] && [ ! -L "$p" ] && printf 's %s/%s\0' "$(stat -c %s "$p")" "$i"
  i=$((i+1))
done
exit 0
"""

_HASH_SCRIPT = r"""
cd /models || exit 3
for f in "$@"; do
  [ -f "$f" ] && [ ! -L "$f" ] || continue
  printf '%s/%s\0' "$(sha256sum "$f" | cut -d ' ' -f 1)" "$f"
done
"""

_COPY_SCRIPT = r"""
src="/src/$1"; part="/models/.$2.$4.partial"; dst="/models/$2"
if [ -L "$src" ]; then printf 'link %s\n' "$(readlink "$src")"; exit 7; fi
if [ ! -f "$src" ]; then echo "not a regular file" >&2; exit 3; fi
size=$(stat -c %s "$src") || exit 3
echo "size $size"
rm -f "/models/.$2.partial" "/models/.$2".*.partial
if ! cp "$src" "$part"; then rm -f "$part"; exit 6; fi
got=$(stat -c %s "$part")
if [ "$got" != "$size" ]; then rm -f "$part"; echo "copied $got of $size bytes" >&2; exit 4; fi
if [ -n "$3" ]; then
  sum=$(sha256sum "$part" | cut -d ' ' -f 1)
  if [ "$sum" != "$3" ]; then rm -f "$part"; echo "sha256 is $sum, expected $3" >&2; exit 5; fi
fi
mv -f "$part" "$dst" || { rm -f "$part"; exit 6; }
echo "done $size"
"""

_REMOVE_SCRIPT = r"""rm -f "/models/$1" "/models/.$1.partial" "/models/.$1".*.partial"""

# Text files (the gateway's config) arrive as /data/.NAME.partial (put_archive into the helper before it
# starts); each is renamed over NAME in order, the previous NAME kept as NAME.bak.
_INSTALL_SCRIPT = r"""
cd /data || exit 3
for f in "$@"; do [ -f ".$f.partial" ] || { echo "$f was not uploaded" >&2; exit 3; }; done
for f in "$@"; do
  if [ -f "$f" ]; then cp -p "$f" ".$f.bak.partial" && mv -f ".$f.bak.partial" "$f.bak" || exit 6; fi
  mv -f ".$f.partial" "$f" || exit 6
done
sync
"""


def container_create_kwargs(desired: ContainerState) -> dict[str, Any]:
    """Keyword arguments of `client.containers.create` for a desired llama.cpp container.

    Pure, so the GPU wiring can be checked without a GPU: `nvidia` gives a device
    request for exactly the container's GPU indices, `dri` passes `/dev/dri`,
    `none` (or no GPUs) gives nothing. The model volume is mounted read-only at
    MODELS_MOUNT.
    """
    config = desired.config
    if config is None:
        raise DriverError(f"container {desired.name} has no configuration to run")
    labels = dict(desired.labels)
    if not labels.get(LABEL_CLUSTER):
        raise DriverError(f"refusing to create container {desired.name} without the {LABEL_CLUSTER} label")
    labels.setdefault(LABEL_NODE, desired.node)
    labels.setdefault(LABEL_MODEL, desired.model)
    labels.setdefault(LABEL_REPLICA, str(desired.replica))
    labels.setdefault(LABEL_HASH, desired.config_hash or config.digest())
    labels.setdefault(LABEL_CONFIG, json.dumps(config.to_json(), sort_keys=True, separators=(",", ":")))
    kwargs: dict[str, Any] = {
        "image": config.image,
        "command": list(config.command),
        "name": desired.name,
        "labels": labels,
        "mounts": [docker.types.Mount(target=MODELS_MOUNT, source=config.volume, type="volume", read_only=True)],
        "network_mode": config.network_mode,
        "restart_policy": {"Name": config.restart_policy},
        "init": True,
    }
    if config.gpus:
        if config.gpu_access == "nvidia":
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(
                    driver="nvidia", device_ids=[str(i) for i in config.gpus], capabilities=[["gpu"]]
                )
            ]
        elif config.gpu_access == "dri":
            kwargs["devices"] = ["/dev/dri:/dev/dri:rwm"]
        elif config.gpu_access != "none":
            raise DriverError(f"container {desired.name}: unknown gpu_access {config.gpu_access!r}")
    return kwargs


def _check_file_name(name: str, what: str = "file") -> None:
    """A plain file name in a volume: no directory part, not hidden (nor `.`/`..`), no NUL."""
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise DriverError(f"{name!r} is not a valid {what} name")


def ssh_host_port(endpoint: str) -> tuple[str, int]:
    """`ssh://user@host:2222` → ("host", 2222); the port defaults to 22."""
    rest = endpoint.removeprefix("ssh://").split("/", 1)[0]
    hostport = rest.rsplit("@", 1)[-1]
    if hostport.startswith("["):  # [IPv6]:port
        host, _, tail = hostport[1:].partition("]")
        return host, int(tail.removeprefix(":") or 22)
    host, sep, port = hostport.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return hostport, 22


def unreachable_reason(exc: BaseException, *, endpoint: str, timeout: float) -> str:
    """Why a Docker endpoint did not answer, in a few words."""
    text = " | ".join(_chain_texts(exc))
    lowered = text.lower()
    if "paramiko" in lowered:
        return "ssh:// endpoints need the paramiko package (pip install paramiko)"
    if "no such file or directory" in lowered or "filenotfounderror" in lowered:
        if endpoint.startswith("unix://"):
            return f"no such socket {endpoint.removeprefix('unix://')}"
        return "no such file or directory"
    if "connection refused" in lowered:
        return "connection refused"
    if "permission denied" in lowered:
        return "permission denied"
    if "timed out" in lowered or "timeout" in lowered:
        return f"timed out after {timeout:g} s"
    if "name or service not known" in lowered or "temporary failure in name resolution" in lowered:
        return "cannot resolve the host name"
    if "ssh" in lowered:
        return "ssh failed: " + _one_line(text)
    return _one_line(text)


def _chain_texts(exc: BaseException) -> Iterator[str]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield f"{type(e).__name__}: {e}"
        todo += [a for a in e.args if isinstance(a, BaseException)]
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        for linked in (e.__cause__, e.__context__):
            if linked is not None:
                todo.append(linked)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return _one_line(str(explanation) if explanation else str(exc))


class DockerEngine:
    """A node's Docker engine. The SDK client is made on first use, so constructing never fails."""

    def __init__(
        self,
        node: Node,
        cluster: str,
        *,
        timeout: float | None = None,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> None:
        if node.docker is None:
            raise DriverError(f"node {node.name} has no `docker` endpoint")
        self.node = node.name
        self.cluster = cluster
        self.address = node.address
        self.endpoint = node.docker.endpoint
        self.timeout = float(timeout if timeout is not None else node.docker.timeout)
        self.helper_image = node.llamacpp.helper_image if node.llamacpp is not None else "busybox:latest"
        self.poll_interval = poll_interval
        self._ssh = node.ssh
        self._proxy: DialStdioProxy | None = None
        self._client: Any = None

    # ------------------------------------------------------------------ plumbing

    def __enter__(self) -> DockerEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None

    def _ssh_proxy(self) -> DialStdioProxy:
        """ssh:// endpoints: the docker SDK talks to a local socket piped through `ssh … docker system
        dial-stdio` with the node's `ssh.key_file` and `ssh.known_hosts` (drivers/sshdocker.py)."""
        if self._proxy is None:
            host, port = ssh_host_port(self.endpoint)
            authority = self.endpoint.removeprefix("ssh://").split("/", 1)[0]
            user = authority.rsplit("@", 1)[0] if "@" in authority else None
            ssh = self._ssh
            self._proxy = DialStdioProxy(
                ssh_argv(
                    host=host,
                    port=port,
                    user=user or (ssh.user if ssh is not None else None),
                    key_file=ssh.key_file if ssh is not None else None,
                    known_hosts=ssh.known_hosts if ssh is not None else "~/.ssh/known_hosts",
                    connect_timeout=self.timeout,
                )
            )
        return self._proxy

    def _check_ssh_port(self) -> None:
        """Before docker-py starts an `ssh` child, see that the node's SSH port answers at all.

        A machine that is off or asleep then reads as one clear line, and no ssh
        process is left behind writing to the terminal.
        """
        host, port = ssh_host_port(self.endpoint)
        try:
            with socket.create_connection((host, port), timeout=self.timeout):
                pass
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            if isinstance(exc, TimeoutError):
                why = f"timed out after {self.timeout:g} s"
            raise NodeUnreachable(
                f"node {self.node}: Docker at {self.endpoint} does not answer: ssh {host}:{port}: {why}"
            ) from None

    def _unreachable(self, exc: BaseException) -> NodeUnreachable:
        reason = unreachable_reason(exc, endpoint=self.endpoint, timeout=self.timeout)
        if self._proxy is not None and self._proxy.last_error:
            reason = f"ssh: {self._proxy.last_error}"  # ssh's own reason beats "connection aborted"
        return NodeUnreachable(f"node {self.node}: Docker at {self.endpoint} does not answer: {reason}")

    @property
    def client(self) -> Any:
        """The docker SDK client (made, and the API version negotiated, on first use)."""
        if self._client is None:
            base_url = self.endpoint
            if self.endpoint.startswith("ssh://"):
                self._check_ssh_port()
                base_url = self._ssh_proxy().url
            self._client = self._negotiated(base_url)
        return self._client

    def _negotiated(self, base_url: str) -> Any:
        """A client at the engine's own API version. `version="auto"` would ask inside the SDK's
        constructor, and when the engine does not answer, the half-made client's socket is never
        closed; here the probe client is closed whatever happens."""
        try:
            if base_url.startswith("unix://"):
                # The SDK's unix connection leaks its socket when connect() fails (engine down):
                # find that out here with a socket that is always closed.
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(self.timeout)
                    sock.connect(base_url.removeprefix("unix://"))
            probe = docker.DockerClient(
                base_url=base_url, version=docker.constants.MINIMUM_DOCKER_API_VERSION, timeout=self.timeout
            )
            try:
                version = str(probe.api.version(api_version=False)["ApiVersion"])
            finally:
                probe.close()
            return docker.DockerClient(base_url=base_url, version=version, timeout=self.timeout)
        except (docker.errors.DockerException, OSError, KeyError, TypeError) as exc:
            raise self._unreachable(exc) from None

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn SDK and connection errors into one-line DriverErrors."""
        try:
            yield
        except DriverError:
            raise
        except docker.errors.APIError as exc:
            raise DriverError(f"node {self.node}: {doing}: {_explain(exc)}") from None
        except (docker.errors.DockerException, OSError) as exc:
            # requests' ConnectionError and Timeout are OSErrors
            raise self._unreachable(exc) from None

    def _require_image(self, image: str) -> None:
        if not self.image_exists(image):
            raise DriverError(f"image {image} is not on node {self.node}; load it there first")

    def _managed(self, name: str) -> Any:
        """The container `name`, or None when there is none; NotManaged when it is not ours."""
        try:
            container = self.client.containers.get(name)
        except docker.errors.NotFound:
            return None
        labels = container.labels or {}
        owner = labels.get(LABEL_CLUSTER)
        if owner is None:
            raise NotManaged(f"container {name} on node {self.node} has no {LABEL_CLUSTER} label; not touching it")
        if owner != self.cluster:
            raise NotManaged(f"container {name} on node {self.node} belongs to cluster {owner}; not touching it")
        return container

    # ------------------------------------------------------------------ DockerNode

    def ping(self) -> None:
        with self._errors("ping"):
            self.client.ping()

    def image_exists(self, image: str) -> bool:
        with self._errors(f"look up image {image}"):
            try:
                self.client.images.get(image)
            except docker.errors.ImageNotFound:
                return False
            return True

    def list_containers(self, cluster: str) -> tuple[list[ContainerState], list[str]]:
        managed: list[ContainerState] = []
        foreign: list[str] = []
        with self._errors("list containers"):
            for summary in self.client.api.containers(all=True):
                labels: dict[str, str] = dict(summary.get("Labels") or {})
                name = str((summary.get("Names") or ["/" + str(summary.get("Id", ""))[:12]])[0]).lstrip("/")
                if LABEL_CLUSTER not in labels:
                    foreign.append(name)
                    continue
                if labels[LABEL_CLUSTER] != cluster or LABEL_ROLE in labels:
                    continue
                try:
                    state = self.client.api.inspect_container(summary["Id"]).get("State") or {}
                except docker.errors.NotFound:
                    continue  # removed since the listing
                managed.append(self._container_state(name, labels, state))
        return sorted(managed, key=lambda c: c.name), sorted(foreign)

    def inspect_all(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        with self._errors("inspect containers"):
            for summary in self.client.api.containers(all=True):
                labels = summary.get("Labels") or {}
                if labels.get(LABEL_ROLE) == HELPER_ROLE:
                    continue
                try:
                    found.append(dict(self.client.api.inspect_container(summary["Id"])))
                except docker.errors.NotFound:
                    continue  # removed since the listing
        return found

    def _container_state(self, name: str, labels: Mapping[str, str], state: Mapping[str, Any]) -> ContainerState:
        config: ContainerConfig | None
        try:
            config = ContainerConfig.from_json(json.loads(labels[LABEL_CONFIG]))
        except (KeyError, TypeError, ValueError, AttributeError):
            config = None
        try:
            replica = int(labels.get(LABEL_REPLICA, "0"))
        except ValueError:
            replica = 0
        status = str(state.get("Status", "unknown"))
        exit_code = state.get("ExitCode")
        return ContainerState(
            name=name,
            node=self.node,
            model=labels.get(LABEL_MODEL, ""),
            replica=replica,
            config=config,
            config_hash=labels.get(LABEL_HASH, ""),
            health_url=health_url(self.address, config.port) if config is not None else "",
            status=status,
            exit_code=int(exit_code) if status in ("exited", "dead") and exit_code is not None else None,
            labels={k: v for k, v in labels.items() if k.startswith("homelab.")},
        )

    def list_volumes(self, cluster: str) -> list[VolumeState]:
        with self._errors("list volumes"):
            volumes = self.client.volumes.list(filters={"label": f"{LABEL_CLUSTER}={cluster}"})
            models = [v for v in volumes if LABEL_ROLE not in (v.attrs.get("Labels") or {})]
            return sorted((VolumeState(node=self.node, name=str(v.name)) for v in models), key=lambda v: v.name)

    def volume_names(self) -> list[str]:
        with self._errors("list volumes"):
            listing = self.client.api.volumes() or {}
            return sorted(str(v.get("Name", "")) for v in listing.get("Volumes") or [])

    def create_volume(self, name: str, labels: dict[str, str]) -> None:
        if not labels.get(LABEL_CLUSTER):
            raise DriverError(f"refusing to create volume {name} without the {LABEL_CLUSTER} label")
        with self._errors(f"create volume {name}"):
            try:
                existing = self.client.volumes.get(name)
            except docker.errors.NotFound:
                self.client.volumes.create(name=name, labels=labels)
                return
            owner = (existing.attrs.get("Labels") or {}).get(LABEL_CLUSTER)
            if owner != labels[LABEL_CLUSTER]:
                raise NotManaged(f"volume {name} on node {self.node} exists and is not this cluster's")

    def list_files(self, volume: str) -> list[FileState]:
        return self.scan_files(volume)[0]

    def scan_files(self, volume: str, sources: Sequence[str] = ()) -> tuple[list[FileState], dict[str, int]]:
        paths = [posixpath.normpath(p) for p in sources if posixpath.isabs(p) and "\0" not in p]
        try:
            return self._scan(volume, paths)
        except DriverError as exc:
            if not paths or "no directory" not in str(exc):
                raise
        return self._scan(volume, [])  # a source's directory is not on the node: its size is not known

    def _scan(self, volume: str, sources: list[str]) -> tuple[list[FileState], dict[str, int]]:
        dirs = sorted({posixpath.dirname(p) for p in sources})
        mounts = [docker.types.Mount(target=MODELS_MOUNT, source=volume, type="volume", read_only=True)]
        mounts += [
            docker.types.Mount(target=f"{SRC_MOUNT}/{i}", source=d or "/", type="bind", read_only=True)
            for i, d in enumerate(dirs)
        ]
        args = [f"{SRC_MOUNT}/{dirs.index(posixpath.dirname(p))}/{posixpath.basename(p)}" for p in sources]
        code, out, err = self._helper(
            [_LIST_SCRIPT, "sh", MODELS_MOUNT, *args],
            mounts=mounts,
            doing=f"list files of volume {volume}",
            require_volume=volume,
        )
        if code != 0:
            raise DriverError(f"node {self.node}: cannot list volume {volume}: {_one_line(err) or f'exit {code}'}")
        files = []
        sizes: dict[str, int] = {}
        for record in out.split("\0"):
            kind, _, rest = record.lstrip("\n").partition(" ")
            head, sep, name = rest.partition("/")
            if kind == "s" and head.isdigit() and name.isdigit() and int(name) < len(sources):
                sizes[sources[int(name)]] = int(head)
                continue
            size, _, mtime = head.partition(" ")
            if kind != "f" or not sep or not size.isdigit() or not name or name.startswith("."):
                continue
            when = int(mtime) if mtime.isdigit() else None
            files.append(FileState(node=self.node, volume=volume, name=name, size=int(size), mtime=when))
        return sorted(files, key=lambda f: f.name), sizes

    def hash_files(self, volume: str, names: Sequence[str]) -> dict[str, str]:
        for name in names:
            _check_file_name(name, "model file")
        if not names:
            return {}
        code, out, err = self._helper(
            [_HASH_SCRIPT, "sh", *names],
            mounts=[docker.types.Mount(target=MODELS_MOUNT, source=volume, type="volume", read_only=True)],
            doing=f"check the sha256 of {', '.join(names)} in volume {volume}",
            require_volume=volume,
            timeout=None,  # tens of gigabytes take minutes; a hash is made once per copy (observe caches it)
        )
        if code != 0:
            raise DriverError(
                f"node {self.node}: cannot hash files of volume {volume}: {_one_line(err) or f'exit {code}'}"
            )
        sums: dict[str, str] = {}
        for record in out.split("\0"):
            digest, sep, name = record.lstrip("\n").partition("/")
            if sep and name in names and re.fullmatch(r"[0-9a-f]{64}", digest):
                sums[name] = digest
        return sums

    def copy_file(
        self,
        volume: str,
        source: str,
        name: str,
        *,
        sha256: str | None = None,
        progress: ProgressFn | None = None,
    ) -> int:
        _check_file_name(name, "model file")
        if not posixpath.isabs(source):
            raise DriverError(f"source {source} must be an absolute path on node {self.node}")
        path = posixpath.normpath(source)
        self.stop_writers(volume, name)  # a killed apply's copy of the same file would still be writing
        for _ in range(MAX_SYMLINK_HOPS):
            code, out, err = self._copy_once(volume, path, name, sha256, progress)
            if code == _EXIT_SYMLINK:
                # The mount shows only the file's directory: follow the link here and mount its target's.
                target = out.strip().removeprefix("link ").strip()
                path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
                continue
            break
        else:
            raise DriverError(f"source {source} on node {self.node}: too many levels of symbolic links")
        why = _one_line(err)
        if code == 0:
            size = int(out.split("size ", 1)[1].split()[0])
            if progress is not None:
                progress(size, size)
            return size
        if code == _EXIT_NO_SOURCE:
            raise DriverError(f"source {source} on node {self.node} is not a regular file")
        if code in (_EXIT_SIZE, _EXIT_SHA):
            raise VerifyFailed(f"copy of {source} to {volume}/{name} on node {self.node} failed verification: {why}")
        raise DriverError(f"copy of {source} to {volume}/{name} on node {self.node} failed: {why or f'exit {code}'}")

    def _copy_once(
        self, volume: str, source: str, name: str, sha256: str | None, progress: ProgressFn | None
    ) -> tuple[int, str, str]:
        directory, base = posixpath.split(source)
        token = uuid.uuid4().hex[:12]
        partial = f"{MODELS_MOUNT}/.{name}.{token}{PARTIAL_SUFFIX}"
        total: int | None = None
        done = -1

        def tick(container: Any) -> None:
            nonlocal total, done
            if progress is None:
                return
            if total is None:
                m = re.search(rb"size (\d+)", container.logs(stdout=True, stderr=False))
                if m is None:
                    return
                total = int(m.group(1))
            result = container.exec_run(["stat", "-c", "%s", partial], stdout=True, stderr=False)
            text = bytes(result.output or b"").strip()
            if result.exit_code == 0 and text.isdigit() and int(text) > done:
                done = int(text)
                progress(min(done, total), total)

        return self._helper(
            [_COPY_SCRIPT, "sh", base, name, (sha256 or "").lower(), token],
            writes=f"{volume}/{name}",
            mounts=[
                docker.types.Mount(target=SRC_MOUNT, source=directory or "/", type="bind", read_only=True),
                docker.types.Mount(target=MODELS_MOUNT, source=volume, type="volume", read_only=False),
            ],
            doing=f"copy {source} to volume {volume}",
            require_volume=volume,
            tick=tick,
            timeout=None,
        )

    def remove_file(self, volume: str, name: str) -> None:
        """Delete `name` (and a stale partial copy of it) from a volume; a missing file is no error."""
        _check_file_name(name, "model file")
        self.stop_writers(volume, name)
        code, _, err = self._helper(
            [_REMOVE_SCRIPT, "sh", name],
            writes=f"{volume}/{name}",
            mounts=[docker.types.Mount(target=MODELS_MOUNT, source=volume, type="volume", read_only=False)],
            doing=f"remove {name} from volume {volume}",
            require_volume=volume,
        )
        if code != 0:
            raise DriverError(f"node {self.node}: cannot remove {volume}/{name}: {_one_line(err) or f'exit {code}'}")

    def run_container(self, desired: ContainerState) -> None:
        kwargs = container_create_kwargs(desired)
        self._require_image(kwargs["image"])
        with self._errors(f"create container {desired.name}"):
            try:
                self.client.containers.get(desired.name)
            except docker.errors.NotFound:
                pass
            else:
                raise DriverError(f"container {desired.name} already exists on node {self.node}")
            container = self.client.containers.create(**kwargs)
        assert desired.config is not None
        if desired.config.preset:
            self._put_preset(container, desired.name, desired.config.preset)
        self._start_new(container, desired.name)

    def _put_preset(self, container: Any, name: str, text: str) -> None:
        """A swap pool's preset into the created (not yet started) container, at PRESET_PATH; the container
        is removed when that fails. It lives in the container's own layer, so a restart keeps it."""
        directory, base = posixpath.split(PRESET_PATH)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = text.encode()
            info = tarfile.TarInfo(base)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        with self._errors(f"write the preset of container {name}"):
            try:
                if not container.put_archive(directory or "/", buf.getvalue()):
                    raise DriverError(f"node {self.node}: the preset of container {name} could not be written")
            except (docker.errors.APIError, DriverError):
                with suppress(docker.errors.APIError):
                    container.remove(force=True)
                raise

    def pool_processes(self, name: str) -> dict[str, float]:
        """A swap pool's loaded (or asleep) members: alias → seconds since its child llama-server started (`docker top`,
        which runs `ps -o pid,etimes,args` on the node). Empty when the container is not running."""
        with self._errors(f"list the processes of container {name}"):
            container = self._managed(name)
            if container is None or container.status != "running":
                return {}
            top = container.top(ps_args="-o pid,etimes,args")  # docker top needs the PID column
        return pool_children(top)

    def _start_new(self, container: Any, name: str) -> None:
        """Start a container just created; one that cannot start (no GPU driver, a bad device, a port in
        use) is not left behind."""
        with self._errors(f"start container {name}"):
            try:
                container.start()
            except docker.errors.APIError:
                with suppress(docker.errors.APIError):
                    container.remove(force=True)
                raise

    def start_container(self, name: str) -> None:
        with self._errors(f"start container {name}"):
            container = self._managed(name)
            if container is None:
                raise DriverError(f"no container {name} on node {self.node}")
            container.start()

    def set_aside(self, name: str, *, timeout: float = 5.0) -> str:
        with self._errors(f"set aside container {name}"):
            try:
                container = self.client.containers.get(name)
            except docker.errors.NotFound:
                raise DriverError(f"no container {name} on node {self.node}") from None
            if LABEL_CLUSTER in (container.labels or {}):
                raise NotManaged(f"container {name} on node {self.node} is homelab's already; not adopting it")
            taken = {c.name for c in self.client.containers.list(all=True)}
            new, n = f"{name}{ADOPTED_SUFFIX}", 2
            while new in taken:
                new, n = f"{name}{ADOPTED_SUFFIX}-{n}", n + 1
            # Restart policy first (a stopped `--restart always` container would come back with the engine), the
            # name before the stop (a `--rm` one is gone once stopped: that is the user's own choice).
            container.update(restart_policy={"Name": "no"})
            container.rename(new)
            with suppress(docker.errors.NotFound):
                if container.status in ("running", "restarting", "paused"):
                    container.stop(timeout=max(0, math.ceil(timeout)))
            return new

    def stop_container(self, name: str, *, timeout: float = 5.0) -> None:
        with self._errors(f"stop container {name}"):
            container = self._managed(name)
            if container is None:
                return
            try:
                if container.status in ("running", "restarting", "paused"):
                    container.stop(timeout=max(0, math.ceil(timeout)))
            except docker.errors.NotFound:
                return

    def remove_container(self, name: str, *, timeout: float = 5.0, adopt: bool = False) -> None:
        with self._errors(f"remove container {name}"):
            if adopt:
                try:
                    container = self.client.containers.get(name)
                except docker.errors.NotFound:
                    return
                if LABEL_CLUSTER in (container.labels or {}):
                    raise NotManaged(f"container {name} on node {self.node} is homelab's already; not adopting it")
            else:
                container = self._managed(name)
            if container is None:
                return
            try:
                if container.status in ("running", "restarting", "paused"):
                    container.stop(timeout=max(0, math.ceil(timeout)))
                container.remove(force=True)
            except docker.errors.NotFound:
                return

    def container_logs(self, name: str, tail: int = 20) -> str:
        with self._errors(f"read logs of container {name}"):
            try:
                container = self.client.containers.get(name)
            except docker.errors.NotFound:
                raise DriverError(f"no container {name} on node {self.node}") from None
            data = container.logs(stdout=True, stderr=True, tail=tail)
        return bytes(data).decode("utf-8", errors="replace")

    def container_pids(self, name: str) -> set[int]:
        """Host PIDs of a managed container's processes (`docker top`); empty when it is not running."""
        with self._errors(f"list processes of container {name}"):
            container = self._managed(name)
            if container is None or container.status != "running":
                return set()
            try:
                top = self.client.api.top(container.id, ps_args="-eo pid")
            except docker.errors.APIError as exc:
                if exc.status_code in (404, 409):  # removed or stopped since the lookup
                    return set()
                raise
        titles = [str(t).strip().upper() for t in top.get("Titles") or []]
        if "PID" not in titles:
            return set()
        column = titles.index("PID")
        return {int(row[column]) for row in top.get("Processes") or [] if str(row[column]).strip().isdigit()}

    def container_memory(self, name: str) -> int | None:
        """Docker's stats API, one sample (`one_shot`): `memory_stats.usage` less the inactive file cache, as the
        `docker stats` CLI shows it (cgroup v2: `inactive_file`; v1: `total_inactive_file`)."""
        with self._errors(f"read memory of container {name}"):
            container = self._managed(name)
            if container is None or container.status != "running":
                return None
            try:
                stats = self.client.api.stats(container.id, stream=False, one_shot=True)
            except docker.errors.APIError as exc:
                if exc.status_code in (404, 409):  # removed or stopped since the lookup
                    return None
                raise
        return stats_memory(stats)

    # ------------------------------------------------------------------ service containers (the gateway)

    def read_volume_files(self, volume: str, names: Sequence[str]) -> dict[str, str | None]:
        """Read through a helper container that is created, never started (`get_archive`), then removed."""
        for name in names:
            _check_file_name(name)
        out: dict[str, str | None] = dict.fromkeys(names)
        with self._errors(f"read volume {volume}"):
            try:
                self.client.volumes.get(volume)
            except docker.errors.NotFound:
                return out
        if not names:
            return out
        self._require_image(self.helper_image)
        with self._errors(f"read volume {volume}"):
            container = self._create_helper(
                ["true"], [docker.types.Mount(target=DATA_MOUNT, source=volume, type="volume", read_only=True)]
            )
            try:
                for name in names:
                    try:
                        stream, _ = container.get_archive(f"{DATA_MOUNT}/{name}")
                    except docker.errors.NotFound:
                        continue
                    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                        member = tar.next()
                        data = tar.extractfile(member) if member is not None and member.isfile() else None
                        out[name] = data.read().decode("utf-8", errors="replace") if data is not None else None
            finally:
                with suppress(docker.errors.DockerException, OSError):
                    container.remove(force=True)
        return out

    def write_volume_files(self, volume: str, files: Sequence[tuple[str, str]], labels: dict[str, str]) -> None:
        for name, _ in files:
            _check_file_name(name)
        self.create_volume(volume, labels)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, text in files:
                data = text.encode()
                info = tarfile.TarInfo(f".{name}{PARTIAL_SUFFIX}")
                info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        code, _, err = self._helper(
            [_INSTALL_SCRIPT, "sh", *(name for name, _ in files)],
            writes=volume,
            mounts=[docker.types.Mount(target=DATA_MOUNT, source=volume, type="volume", read_only=False)],
            doing=f"write {', '.join(n for n, _ in files)} into volume {volume}",
            require_volume=volume,
            archive=(DATA_MOUNT, buf.getvalue()),
        )
        if code != 0:
            why = _one_line(err) or f"exit {code}"
            raise DriverError(f"node {self.node}: cannot write into volume {volume}: {why}")

    def run_service(self, desired: ServiceContainer, env: Mapping[str, str]) -> None:
        self._require_image(desired.image)
        labels = {
            LABEL_CLUSTER: self.cluster,
            LABEL_NODE: self.node,
            LABEL_ROLE: desired.role,
            LABEL_HASH: desired.config_hash,
        }
        with self._errors(f"re-create container {desired.name}"):
            old = self._managed(desired.name)
            if old is not None:
                with suppress(docker.errors.NotFound):
                    if old.status in ("running", "restarting", "paused"):
                        old.stop(timeout=10)
                    old.remove(force=True)
            container = self.client.containers.create(
                desired.image,
                command=list(desired.command),
                name=desired.name,
                labels=labels,
                environment=dict(env),
                mounts=[docker.types.Mount(target=desired.mount, source=desired.volume, type="volume", read_only=True)],
                network_mode=desired.network_mode,
                restart_policy={"Name": desired.restart_policy},
                init=True,
            )
        self._start_new(container, desired.name)

    def service_status(self, name: str) -> tuple[str, str] | None:
        with self._errors(f"look up container {name}"):
            container = self._managed(name)
            if container is None:
                return None
            return str(container.status), str((container.labels or {}).get(LABEL_HASH, ""))

    # ------------------------------------------------------------------ helper containers

    def _helpers(self, writes: str | None = None) -> list[Any]:
        """This cluster's helper containers (`writes`: only those labelled as writing that)."""
        wanted = [f"{LABEL_CLUSTER}={self.cluster}", f"{LABEL_ROLE}={HELPER_ROLE}"]
        if writes is not None:
            wanted.append(f"{LABEL_WRITES}={writes}")
        return list(self.client.containers.list(all=True, filters={"label": wanted}))

    def _remove_helper(self, container: Any) -> None:
        with suppress(docker.errors.NotFound):
            container.remove(force=True)  # SIGKILL: it writes nothing more, its partial file is removed after

    def stop_writers(self, volume: str, name: str) -> list[str]:
        """Stop and remove this cluster's helpers that write VOLUME/NAME (a killed apply's copy); their names."""
        with self._errors(f"stop helper containers writing {volume}/{name}"):
            found = self._helpers(f"{volume}/{name}")
            for container in found:
                self._remove_helper(container)
        return sorted(str(c.name) for c in found)

    def clean_helpers(self) -> list[str]:
        """Remove this cluster's helpers that have finished (or never started, for an hour) and every one that
        writes: run while the apply lock is held, when no other apply can be writing. Their names."""
        removed: list[str] = []
        with self._errors("remove leftover helper containers"):
            for container in self._helpers():
                labels = container.labels or {}
                if (
                    LABEL_WRITES in labels
                    or container.status in ("exited", "dead")
                    or (container.status == "created" and _age_s(container) > STALE_HELPER_S)
                ):
                    self._remove_helper(container)
                    removed.append(str(container.name))
        return sorted(removed)

    def _create_helper(self, command: list[str], mounts: list[Any], writes: str | None = None) -> Any:
        labels = {LABEL_CLUSTER: self.cluster, LABEL_ROLE: HELPER_ROLE, LABEL_NODE: self.node}
        if writes is not None:
            labels[LABEL_WRITES] = writes
        return self.client.containers.create(
            self.helper_image,
            entrypoint=["/bin/sh", "-c"],
            command=command,
            name=f"homelab-helper-{uuid.uuid4().hex[:12]}",
            labels=labels,
            mounts=mounts,
            network_mode="none",
        )

    def _helper(
        self,
        command: list[str],
        *,
        mounts: list[Any],
        doing: str,
        require_volume: str | None = None,
        tick: Callable[[Any], None] | None = None,
        timeout: float | None = 120.0,
        archive: tuple[str, bytes] | None = None,
        writes: str | None = None,
    ) -> tuple[int, str, str]:
        """Run `sh -c SCRIPT ARGS…` in a throwaway helper container; (exit code, stdout, stderr).

        `archive` (directory, tar bytes) is unpacked into the container (its volumes) before it starts; `writes`
        (VOLUME/NAME or VOLUME) labels a helper that writes there (LABEL_WRITES)."""
        self._require_image(self.helper_image)
        with self._errors(doing):
            if require_volume is not None:
                try:
                    self.client.volumes.get(require_volume)
                except docker.errors.NotFound:
                    raise DriverError(f"no volume {require_volume} on node {self.node}") from None
            try:
                container = self._create_helper(command, mounts, writes)
            except docker.errors.APIError as exc:
                text = _explain(exc)
                if "bind source path does not exist" in text:
                    path = text.rsplit(":", 1)[-1].strip()
                    raise DriverError(f"{doing}: no directory {path} on node {self.node}") from None
                raise
            try:
                if archive is not None and not container.put_archive(*archive):
                    raise DriverError(f"node {self.node}: {doing}: the files could not be put into the helper")
                container.start()
                start = time.monotonic()
                next_tick = start
                delay = 0.01  # most helpers finish in a few tens of milliseconds
                while True:
                    container.reload()
                    if container.status not in ("created", "running", "restarting"):
                        break
                    now = time.monotonic()
                    if tick is not None and now >= next_tick:
                        next_tick = now + self.poll_interval
                        with suppress(docker.errors.APIError):  # it may finish between the reload and the exec
                            tick(container)
                    if timeout is not None and now - start > timeout:
                        raise DriverError(f"node {self.node}: {doing}: helper container timed out after {timeout:g} s")
                    time.sleep(delay)
                    delay = min(delay * 2, self.poll_interval)
                code = int(container.wait(timeout=self.timeout).get("StatusCode", -1))
                out = bytes(container.logs(stdout=True, stderr=False)).decode("utf-8", errors="replace")
                err = bytes(container.logs(stdout=False, stderr=True)).decode("utf-8", errors="replace")
                return code, out, err
            finally:
                with suppress(docker.errors.DockerException, OSError):
                    container.remove(force=True)


def _age_s(container: Any) -> float:
    """Seconds since Docker created the container (0 when its `Created` time cannot be read)."""
    created = str((container.attrs or {}).get("Created", ""))
    try:
        when = datetime.datetime.fromisoformat(created[:19]).replace(tzinfo=datetime.UTC)
    except ValueError:
        return 0.0
    return (datetime.datetime.now(datetime.UTC) - when).total_seconds()


def pool_children(top: Mapping[str, Any]) -> dict[str, float]:
    """alias → elapsed seconds of each child llama-server in `docker top -o pid,etimes,args` output (the router
    starts a child with `--alias NAME` for each member it loads)."""
    titles = [str(t).upper() for t in top.get("Titles") or []]
    try:
        t_col, a_col = titles.index("ELAPSED"), titles.index("COMMAND")
    except ValueError:
        return {}
    out: dict[str, float] = {}
    for row in top.get("Processes") or []:
        try:
            elapsed = float(row[t_col])
            argv = str(row[a_col]).split()
        except (IndexError, TypeError, ValueError):
            continue
        if "--alias" in argv[:-1] and "--models-preset" not in argv:
            out[argv[argv.index("--alias") + 1]] = elapsed
    return out


def stats_memory(stats: Mapping[str, Any]) -> int | None:
    """The memory figure of one Docker stats sample (None when the engine gave none, e.g. a stopped container)."""
    memory = stats.get("memory_stats") or {}
    usage = memory.get("usage")
    if not isinstance(usage, int) or usage <= 0:
        return None
    detail = memory.get("stats") or {}
    inactive = detail.get("inactive_file", detail.get("total_inactive_file", 0))
    if isinstance(inactive, int) and 0 < inactive < usage:
        return usage - inactive
    return usage
