"""A private OpenSSH server for tests, on loopback addresses, with keys and known_hosts of its own.

    with Sshd(["127.0.0.2", "127.0.0.3"]) as server:
        key = server.add_client_key("gpu", env={"PATH": "/tmp/bin:/usr/bin:/bin"})
        server.known_hosts           # a known_hosts file with the server's key for every address
        server.port

The server is started the way the test-machine notes say
(`/work/shared/reference/test-components.md`, OpenSSH): a test-owned config
with `ListenAddress` per address, a free `Port`, a fresh `HostKey`, `PidFile`,
`AuthorizedKeysFile`, `PermitRootLogin prohibit-password`,
`PasswordAuthentication no`, `UsePAM no`, `StrictModes no`, run as
`sshd -D -e -f CONFIG`. `PermitUserEnvironment yes` lets each client key carry
its own environment through the `environment="…"` option of authorized_keys,
so one server can give each test node its own PATH (and so its own stand-in
`nvidia-smi`). It logs in as the user running the tests (root), so it needs
root and the `sshd` binary (Debian's openssh-server); `available()` says why
not when they are missing. `stop()` kills the listener and every session it
forked (a dead machine, not just a closed port).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.support.ports import free_port

START_TIMEOUT_S = 15.0


class SshdError(RuntimeError):
    """sshd could not be started or did not answer."""


def sshd_binary() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.access(p, os.X_OK)), None)


def available() -> str | None:
    """None when a private sshd can be started here, else the reason it cannot."""
    if sshd_binary() is None:
        return "sshd is not installed (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is not installed (apt-get install openssh-client)"
    if os.geteuid() != 0:
        return "the test sshd logs in as root and needs root"
    return None


def keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


class Sshd:
    """One private sshd listening on `addresses` (all on one port); a context manager."""

    def __init__(
        self, addresses: Sequence[str] = ("127.0.0.2",), root: Path | None = None, port: int | None = None
    ) -> None:
        """Its keys, config and log in a fresh temporary directory, or in `root` (created); on `port`, or a
        free one."""
        self.addresses = list(addresses)
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix="hl-sshd-"))
        else:
            root.mkdir(parents=True, exist_ok=True)
            self.root = root
        self.root.chmod(0o755)
        self.user = getpass.getuser()
        self.port = port if port is not None else free_port(self.addresses[0])
        self.host_key = self.root / "host_ed25519"
        self.authorized_keys = self.root / "authorized_keys"
        self.known_hosts = self.root / "known_hosts"
        self.config = self.root / "sshd_config"
        self.pid_file = self.root / "sshd.pid"
        self.log_path = self.root / "sshd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        keygen(self.host_key, "homelab-test-host")
        self.authorized_keys.write_text("")
        host_pub = (self.root / "host_ed25519.pub").read_text().split()
        self.known_hosts.write_text("".join(f"[{a}]:{self.port} {host_pub[0]} {host_pub[1]}\n" for a in self.addresses))
        listen = "".join(f"ListenAddress {a}\n" for a in self.addresses)
        self.config.write_text(
            f"{listen}Port {self.port}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.pid_file}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitUserEnvironment yes\n"
            "LogLevel VERBOSE\n"
        )

    def add_client_key(self, name: str, env: Mapping[str, str] | None = None) -> Path:
        """A fresh client key allowed to log in; its sessions get `env` (e.g. a PATH with stand-ins)."""
        key = self.root / f"client_{name}"
        keygen(key, f"homelab-test-{name}")
        options = ",".join(f'environment="{k}={v}"' for k, v in (env or {}).items())
        line = (options + " " if options else "") + (self.root / f"client_{name}.pub").read_text()
        with self.authorized_keys.open("a") as f:
            f.write(line if line.endswith("\n") else line + "\n")
        return key

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        binary = sshd_binary()
        if binary is None:
            raise SshdError("sshd is not installed")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # its privilege-separation directory
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [binary, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SshdError(f"sshd exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((self.addresses[0], self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SshdError(f"sshd did not listen on {self.addresses[0]}:{self.port} in {timeout:g} s")

    def stop(self) -> None:
        """Kill the listener and the sessions it forked."""
        if self._proc is None:
            return
        children = _children(self._proc.pid)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait(timeout=10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> Sshd:
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
