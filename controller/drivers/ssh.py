"""Run a command on a node: over SSH (asyncssh), or directly when the node is this machine.

    async with node_shell(node) as shell:
        result = await shell.run(["nvidia-smi", "--query-gpu=index", "--format=csv"], timeout=15)
        result.exit_status, result.stdout, result.stderr

Which way a node is reached (`is_local`): a node is **local** when its address
is a loopback address (127.0.0.0/8, ::1, `localhost`) **and** it has no `ssh`
section; its commands run as child processes of `homelab`. Every other node is
reached over SSH, so a loopback node with an `ssh` section (an SSH server on
127.0.0.2, as in the tests) goes through exactly the production path.

SSH rules:

- Connect to `address:ssh.port` as `ssh.user`, with `ssh.key_file` when given
  (then only that key: no agent, no default keys), else the SSH agent and the
  default keys. `~/.ssh/config` is not read: the spec says everything.
- The host key is checked against `ssh.known_hosts` and never accepted
  unchecked: an unknown or changed key, or a missing known_hosts file, is a
  `HostKeyRejected` / `SshFailed` with one line saying what to do.
- A command is a list of arguments (quoted with `shlex.join` for the remote
  shell) or a string for the remote shell as is; stdin is bytes, passed on the
  channel (never in argv). The result is (exit status, stdout, stderr) as bytes;
  a non-zero exit is a result, not an error. A command that runs past its
  timeout is a `CommandFailed`.
- Every error is one line that starts with `node NAME:`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from controller.drivers.base import CommandFailed, HostKeyRejected, SshFailed
from specs.lazy import LazyModule
from specs.model import Node

if TYPE_CHECKING:
    import asyncssh
else:  # asyncssh only when a command opens an SSH session (`SshShell.__aenter__` imports it)
    asyncssh = LazyModule("asyncssh")

DEFAULT_TIMEOUT_S = 30.0
NOT_FOUND = 127
"""The exit status a shell gives for a command it cannot find; a local run reports the same."""

Command = Sequence[str] | str


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    """The command's exit status; -1 when it was killed by a signal."""
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def error_line(self) -> str:
        """stderr (or stdout when stderr is empty) as one short line."""
        raw = self.stderr.strip() or self.stdout.strip()
        line = " ".join(raw.decode("utf-8", errors="replace").split())
        return line if len(line) <= 200 else line[:197] + "..."


class NodeShell(Protocol):
    """Runs commands on one node."""

    node: str

    async def run(
        self, command: Command, *, stdin: bytes | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> CommandResult: ...

    async def __aenter__(self) -> NodeShell: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def is_local(node: Node) -> bool:
    """True when the node is this machine: a loopback address and no `ssh` section (see the module docstring)."""
    if node.ssh is not None:
        return False
    if node.address.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(node.address.strip("[]")).is_loopback
    except ValueError:
        return False


def node_shell(node: Node) -> NodeShell:
    """A local shell for a local node, an SSH session otherwise (SshFailed when the node has no `ssh`)."""
    if is_local(node):
        return LocalShell(node.name)
    return SshShell(node)


def _command_text(command: Command) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def _first_word(command: Command) -> str:
    if isinstance(command, str):
        return command.split(maxsplit=1)[0] if command.strip() else command
    return command[0] if command else ""


# --------------------------------------------------------------------------- local


class LocalShell:
    """Commands as child processes of `homelab` (a list runs without a shell, a string with `sh -c`)."""

    def __init__(self, node: str) -> None:
        self.node = node

    async def __aenter__(self) -> LocalShell:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def run(
        self, command: Command, *, stdin: bytes | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> CommandResult:
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            return CommandResult(NOT_FOUND, b"", f"{argv[0]}: command not found".encode())
        except PermissionError:
            return CommandResult(126, b"", f"{argv[0]}: permission denied".encode())
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CommandFailed(f"node {self.node}: {_first_word(command)} timed out after {timeout:g} s") from None
        code = proc.returncode if proc.returncode is not None and proc.returncode >= 0 else -1
        return CommandResult(code, out, err)


# --------------------------------------------------------------------------- ssh


class SshShell:
    """One SSH connection to a node, opened on entering and closed on leaving."""

    def __init__(self, node: Node) -> None:
        if node.ssh is None:
            raise SshFailed(f"node {node.name}: no `ssh` section: cannot reach {node.address} over SSH")
        self.node = node.name
        self.address = node.address
        self.ssh = node.ssh
        self.where = f"{node.ssh.user}@{node.address}:{node.ssh.port}"
        self._conn: asyncssh.SSHClientConnection | None = None

    def _fail(self, why: str) -> SshFailed:
        return SshFailed(f"node {self.node}: ssh {self.where}: {why}")

    async def __aenter__(self) -> SshShell:
        known_hosts = Path(self.ssh.known_hosts).expanduser()
        if not known_hosts.is_file():
            raise HostKeyRejected(
                f"node {self.node}: ssh {self.where}: known_hosts file {known_hosts} does not exist;"
                " host keys are never accepted unchecked"
            )
        keys: dict[str, object] = {}
        if self.ssh.key_file is not None:
            key_file = Path(self.ssh.key_file).expanduser()
            if not key_file.is_file():
                raise self._fail(f"key_file {key_file} does not exist")
            keys = {"client_keys": [str(key_file)], "agent_path": None}
        with warnings.catch_warnings():
            # asyncssh builds its DSA key types at import time (this first use imports it), and
            # cryptography >= 51 warns about DSA there. homelab never offers or accepts DSA keys; the
            # warning would reach every user's terminal (and fails the test suite, which turns warnings
            # into errors).
            warnings.filterwarnings("ignore", message="DSA is deprecated")
            connect = asyncssh.connect
        try:
            self._conn = await connect(
                self.address,
                port=self.ssh.port,
                username=self.ssh.user,
                known_hosts=str(known_hosts),
                config=None,
                connect_timeout=self.ssh.connect_timeout,
                login_timeout=self.ssh.connect_timeout,
                **keys,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise HostKeyRejected(
                f"node {self.node}: ssh {self.where}: host key not trusted: it is not in {known_hosts}, or it changed;"
                f" check it, then add it (ssh-keyscan -p {self.ssh.port} {self.address} >> {known_hosts})"
            ) from None
        except asyncssh.PermissionDenied:
            raise self._fail("permission denied (the key was not accepted)") from None
        except asyncssh.KeyImportError as exc:
            raise self._fail(f"cannot read key_file {self.ssh.key_file}: {exc}") from None
        except ConnectionRefusedError:
            raise self._fail("connection refused") from None
        except (TimeoutError, asyncssh.misc.ConnectionLost) as exc:
            if isinstance(exc, TimeoutError):
                raise self._fail(f"timed out after {self.ssh.connect_timeout:g} s") from None
            raise self._fail(f"connection lost: {exc}") from None
        except asyncssh.Error as exc:
            raise self._fail(" ".join(str(exc.reason or exc).split())) from None
        except OSError as exc:
            raise self._fail(exc.strerror or type(exc).__name__) from None
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None

    async def run(
        self, command: Command, *, stdin: bytes | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> CommandResult:
        if self._conn is None:
            raise self._fail("not connected (use `async with`)")
        try:
            result = await asyncio.wait_for(
                self._conn.run(_command_text(command), input=stdin, encoding=None, check=False), timeout
            )
        except TimeoutError:
            raise CommandFailed(
                f"node {self.node}: {_first_word(command)} timed out after {timeout:g} s (over ssh)"
            ) from None
        except asyncssh.Error as exc:
            raise self._fail(f"{_first_word(command)}: {' '.join(str(exc.reason or exc).split())}") from None
        except OSError as exc:
            raise self._fail(f"{_first_word(command)}: {exc.strerror or type(exc).__name__}") from None
        status = result.exit_status if result.exit_status is not None else -1
        return CommandResult(status, _as_bytes(result.stdout), _as_bytes(result.stderr))


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    return b""
