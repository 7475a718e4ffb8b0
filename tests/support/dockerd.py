"""A private Docker engine for tests: its own data root, exec root and unix socket.

    with Dockerd() as daemon:          # starts dockerd, waits until it answers
        client = daemon.client()
        daemon.stop()                  # "Docker is down" (the socket goes away, data stays)
        daemon.start()                 # the same daemon again, same data, same socket path
    # stopped, netns mount released, every file under its root removed

The daemon is started the way the test-machine notes say works:

    HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 dockerd \
        --data-root R/data --exec-root R/exec --pidfile R/dockerd.pid -H unix://R/docker.sock \
        --iptables=false --ip6tables=false --bridge=none

The proxy variables make any accidental image pull fail at once; `--bridge=none`
means containers use `network_mode="host"` and bind to 127.0.0.1. R is short
(`/tmp/hl-XXXXXX`) because a unix socket path may not exceed 108 bytes. It
needs root and the `dockerd` binary (Debian's docker.io); `available()` says
why not when they are missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import docker

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


class DockerdError(RuntimeError):
    """dockerd could not be started or did not answer."""


def available() -> str | None:
    """None when a private dockerd can be started here, else the reason it cannot."""
    if shutil.which("dockerd") is None:
        return "dockerd is not installed (apt-get install docker.io)"
    if os.geteuid() != 0:
        return "dockerd needs root"
    return None


class Dockerd:
    """One private dockerd; a context manager. `stop()` and `start()` may be repeated."""

    def __init__(self, *, prefix: str = "/tmp/hl-", root: Path | None = None) -> None:
        """A fresh temporary root under `prefix`, or `root` (created; removed again by `close`)."""
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix=Path(prefix).name, dir=str(Path(prefix).parent)))
        else:
            root.mkdir(parents=True, exist_ok=True)
            self.root = root
        self.socket = self.root / "docker.sock"
        if len(str(self.socket).encode()) > 100:
            raise DockerdError(f"socket path {self.socket} is too long for a unix socket")
        self.url = f"unix://{self.socket}"
        self.log_path = self.root / "dockerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start dockerd (again, after `stop`) and wait until it answers a ping."""
        if self.running:
            return
        env = dict(os.environ)
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[key] = "http://127.0.0.1:9"
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        env.pop("DOCKER_HOST", None)
        args = [
            "dockerd",
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "exec"),
            "--pidfile",
            str(self.root / "dockerd.pid"),
            "-H",
            self.url,
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
        ]
        self._log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._release()
                raise DockerdError(f"dockerd exited with {code} while starting:\n{self.log_tail()}")
            if self.socket.exists() and self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise DockerdError(f"dockerd did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM dockerd and wait (SIGKILL after `timeout`); its data stays for a later `start`."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._release()
        # dockerd leaves its nsfs mount behind; a later start makes a new one.
        umount_under(self.root / "exec" / "netns")

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop dockerd, release every mount under its root and remove the root."""
        try:
            self.stop()
        finally:
            umount_under(self.root)
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dockerd:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def client(self, timeout: float = 30.0) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=int(timeout))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _answers(self) -> bool:
        try:
            client = docker.APIClient(base_url=self.url, version="auto", timeout=2)
        except docker.errors.DockerException:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    def _release(self) -> None:
        self._proc = None
        if self._log is not None:
            os.close(self._log)
            self._log = None


def mounts_under(path: Path) -> list[str]:
    """Every mount point at or below `path`."""
    prefix = str(path)
    return [p for p in _mount_points() if p == prefix or p.startswith(prefix + "/")]


def umount_under(path: Path) -> None:
    """Lazily unmount every mount point at or below `path`, deepest first."""
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _mount_points() -> list[str]:
    points = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            # mountinfo escapes spaces and such as octal (\040)
            points.append(fields[4].encode().decode("unicode_escape"))
    return points
