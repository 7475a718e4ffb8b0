"""The seams between the engine and the outside world.

DriverError                    anything a driver could not do (one line, for the user)
├── NodeUnreachable            the node's engine does not answer: observed as unreachable, never as empty
│   └── SshFailed              no SSH session: refused, timed out, key not accepted, no known_hosts (drivers.ssh)
│       └── HostKeyRejected    the node's host key is not in known_hosts, or has changed: never auto-accepted
├── NotManaged                 refused: the object has no homelab labels
├── VerifyFailed               a copied file's size or checksum is not what was expected
├── CommandFailed              a command on a node could not run, timed out or failed (drivers.ssh, drivers.gpu)
└── BadOutput                  a command answered with output that cannot be read (drivers.gpu)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from controller.core.state import (
    ContainerState,
    FileState,
    GatewayState,
    OllamaModelState,
    ServiceContainer,
    VolumeState,
)
from specs.errors import HomelabError


class DriverError(HomelabError):
    """A driver could not do what was asked; the message is one line fit for a user."""


class NodeUnreachable(DriverError):
    pass


class NotManaged(DriverError):
    pass


class VerifyFailed(DriverError):
    pass


class SshFailed(NodeUnreachable):
    pass


class HostKeyRejected(SshFailed):
    pass


class CommandFailed(DriverError):
    pass


class BadOutput(DriverError):
    pass


ProgressFn = Callable[[int, int], None]
"""progress(bytes_done, bytes_total)."""


class DockerNode(Protocol):
    """One node's Docker engine, as the engine needs it. Every object it creates is labelled."""

    node: str

    def ping(self) -> None:
        """Raise NodeUnreachable when the engine does not answer."""

    def image_exists(self, image: str) -> bool: ...

    def list_containers(self, cluster: str) -> tuple[list[ContainerState], list[str]]:
        """(managed containers of `cluster`, names of containers without homelab labels)."""
        ...

    def inspect_all(self) -> list[dict[str, Any]]:
        """`docker inspect` of every container on the node, labelled or not (import, adoption)."""
        ...

    def list_volumes(self, cluster: str) -> list[VolumeState]: ...

    def volume_names(self) -> list[str]:
        """The name of every volume on the engine, labelled or not."""
        ...

    def list_files(self, volume: str) -> list[FileState]:
        """Files in a managed volume, with their sizes (a short-lived helper container reads them)."""
        ...

    def scan_files(self, volume: str, sources: Sequence[str] = ()) -> tuple[list[FileState], dict[str, int]]:
        """In one helper run: the files of a managed volume (size and mtime), and the size of each of `sources`
        (absolute paths on the node) that is a regular file there — one that is missing, a link or not a file is
        left out (so is every one whose directory is missing)."""
        ...

    def hash_files(self, volume: str, names: Sequence[str]) -> dict[str, str]:
        """The sha256 (lower-case hex) of each named file of a managed volume, in one helper run; a name that is
        not a regular file there is left out."""
        ...

    def create_volume(self, name: str, labels: dict[str, str]) -> None: ...

    def copy_file(
        self,
        volume: str,
        source: str,
        name: str,
        *,
        sha256: str | None = None,
        progress: ProgressFn | None = None,
    ) -> int:
        """Copy `source` (a path on the node) into `volume` as `name`; return its size.

        Copies to a temporary name of its own, verifies the size against the source
        (and the checksum when given), then renames: a half-copied file is never
        visible under `name`. A helper still writing `name` (a killed apply's) is
        stopped first, and its partial copies removed. Raises VerifyFailed, DriverError.
        """
        ...

    def remove_file(self, volume: str, name: str) -> None:
        """Delete a file (or a leftover partial copy of it) from a managed volume."""

    def clean_helpers(self) -> list[str]:
        """Remove this cluster's helper containers that have finished, and those that write (a killed apply's copy
        goes on writing its partial file): called at the start of each apply, with the apply lock held. Returns
        their names."""
        ...

    def run_container(self, desired: ContainerState) -> None:
        """Create and start a container from its desired state (labels, GPUs, volume read-only)."""

    def start_container(self, name: str) -> None:
        """Start an existing managed container (raises NotManaged for an unlabelled one)."""

    def set_aside(self, name: str, *, timeout: float = 5.0) -> str:
        """Stop an unlabelled container the spec adopts and keep it, renamed `NAME-adopted-by-homelab` with restart
        policy `no` (its `docker run` settings stay, so the user can go back); returns its new name."""
        ...

    def stop_container(self, name: str, *, timeout: float = 5.0) -> None:
        """Stop a running managed container and keep it (a container that failed its health check: the next plan
        sees it stopped and starts it again; `docker logs` still has its output)."""

    def remove_container(self, name: str, *, timeout: float = 5.0, adopt: bool = False) -> None:
        """Stop (SIGTERM, then SIGKILL after `timeout`) and remove a managed container; with `adopt`, an
        unlabelled one the spec adopts (its replacement is started right after)."""

    def container_logs(self, name: str, tail: int = 20) -> str: ...

    def container_pids(self, name: str) -> set[int]:
        """Process IDs (as the node's kernel numbers them) of a running managed container; empty if not running."""
        ...

    def container_memory(self, name: str) -> int | None:
        """Bytes of host memory a running managed container holds now, as `docker stats` counts it (the cgroup's
        usage less its inactive file cache); None when it is not running or the engine reports no figure."""
        ...

    def pool_processes(self, name: str) -> dict[str, float]:
        """A running swap pool's member processes: alias → seconds since its child llama-server started
        (empty when the container is not running)."""
        ...

    def read_volume_files(self, volume: str, names: Sequence[str]) -> dict[str, str | None]:
        """The text of each named file in a managed volume (None: missing; every one None when the volume is)."""
        ...

    def write_volume_files(self, volume: str, files: Sequence[tuple[str, str]], labels: dict[str, str]) -> None:
        """Write text files into a volume (created with `labels` when missing), in order: each to a temporary name,
        then renamed over the old one, which is kept as NAME.bak."""

    def run_service(self, desired: ServiceContainer, env: Mapping[str, str]) -> None:
        """(Re-)create and start a managed container that is not a model server (the gateway): a container of the
        same name is stopped and removed first (NotManaged when it is not ours). `env` is its environment, resolved
        by the caller at the moment of use; it is never put in a label or the command line."""

    def service_status(self, name: str) -> tuple[str, str] | None:
        """(Docker's status, its `homelab.spec-hash` label) of a managed service container; None when there is none."""
        ...


class OllamaNode(Protocol):
    """One node's Ollama server (`controller.drivers.ollama`; `fake_ollama` in tests).

    Names are Ollama's full names (`qwen2.5:14b`, `homelab/chat:latest`).
    """

    node: str

    def ping(self) -> None:
        """Raise NodeUnreachable when the server does not answer."""

    def list_models(self) -> list[str]:
        """Every model on the server (`/api/tags`)."""
        ...

    def loaded(self) -> list[str]:
        """Models loaded in memory now (`/api/ps`)."""
        ...

    def derived(self, name: str) -> OllamaModelState:
        """A model's base and parameters, from `/api/show` (`details.parent_model`, `parameters`)."""
        ...

    def derived_many(self, names: Sequence[str]) -> list[OllamaModelState]:
        """`derived` of each name, in the order given (the HTTP driver reads them concurrently)."""
        ...

    def model_info(self, name: str) -> dict[str, object]:
        """`/api/show`'s `model_info` (GGUF metadata keys) and `details`, for the memory estimator."""
        ...

    def pull(self, tag: str, progress: ProgressFn | None = None) -> None:
        """Pull `tag`; progress(bytes done, bytes total). Raises DriverError unless Ollama reported success."""

    def create(self, desired: OllamaModelState) -> None:
        """Create (or overwrite) a derived model from its base with `num_gpu` and `num_ctx` (`/api/create`)."""

    def delete(self, name: str) -> None:
        """Delete a model (`/api/delete`); one that is already gone is not an error."""

    def preload(self, name: str, keep_alive: float | None) -> None:
        """Load a model and keep it loaded for `keep_alive` seconds (None: until Ollama stops)."""


class Gateway(Protocol):
    """The LiteLLM proxy's config file and its process (`controller.drivers.litellm`)."""

    def read_config(self) -> str | None:
        """The config file's text, or None when there is none."""
        ...

    def alive(self) -> bool:
        """Whether the proxy answers `/health/liveliness` (never `/health`, which probes every model)."""
        ...

    def write_config(self, desired: GatewayState) -> None:
        """Write the config atomically, keeping the previous file as NAME.bak."""

    def restart(self, desired: GatewayState) -> None:
        """Restart the proxy so it reads the new config (LiteLLM reads its file only at start)."""

    def wait_live(self, desired: GatewayState, timeout: float) -> None:
        """Return once `/health/liveliness` answers 200; raise DriverError after `timeout`."""

    def container_hash(self) -> str:
        """mode container: the `homelab.spec-hash` label of the proxy's container ("" when there is none)."""
        ...
