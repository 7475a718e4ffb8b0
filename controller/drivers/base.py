"""The seams between the engine and the outside world.

DriverError                    anything a driver could not do (one line, for the user)
├── NodeUnreachable            the node's engine does not answer: observed as unreachable, never as empty
├── NotManaged                 refused: the object has no homelab labels
└── VerifyFailed               a copied file's size or checksum is not what was expected
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from controller.state import ContainerState, FileState, VolumeState


class DriverError(Exception):
    """A driver could not do what was asked; the message is one line fit for a user."""


class NodeUnreachable(DriverError):
    pass


class NotManaged(DriverError):
    pass


class VerifyFailed(DriverError):
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

    def list_volumes(self, cluster: str) -> list[VolumeState]: ...

    def list_files(self, volume: str) -> list[FileState]:
        """Files in a managed volume, with their sizes (a short-lived helper container reads them)."""
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

        Copies to a temporary name, verifies the size against the source (and the
        checksum when given), then renames: a half-copied file is never visible
        under `name`. Raises VerifyFailed, DriverError.
        """
        ...

    def remove_file(self, volume: str, name: str) -> None:
        """Delete a file (or a leftover partial copy of it) from a managed volume."""

    def run_container(self, desired: ContainerState) -> None:
        """Create and start a container from its desired state (labels, GPUs, volume read-only)."""

    def start_container(self, name: str) -> None:
        """Start an existing managed container (raises NotManaged for an unlabelled one)."""

    def remove_container(self, name: str, *, timeout: float = 5.0) -> None:
        """Stop (SIGTERM, then SIGKILL after `timeout`) and remove a managed container."""

    def container_logs(self, name: str, tail: int = 20) -> str: ...
