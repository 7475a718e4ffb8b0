"""The LiteLLM proxy: its config file, its liveliness, and (mode `process`) the proxy process itself.

`LocalGateway` implements `controller.drivers.base.Gateway` on the machine that
runs homelab:

- the config is written with `specs.files.atomic_write` (temporary file, fsync,
  rename; the previous file kept as NAME.bak), after the files that go next to it
  (`GatewayState.files`: the classifier plugin `homelab_router.py`, which the proxy
  loads from the config's directory); a missing or edited one shows as a change;
- health is `GET /health/liveliness` — never `/health`, which calls every model
  and hangs while one of them is down;
- mode `process`: homelab starts the proxy (`gateway.command --config PATH --host H
  --port P`) in a session of its own, records its pid in STATE_DIR/litellm.pid and
  its output in STATE_DIR/litellm.log, and restarts it to apply a new config
  (LiteLLM reads its file only at start). The master key is resolved from its
  reference (env:, file:, cmd:) at that moment and handed over in the proxy's
  environment, under the variable the config names — never in argv, the file,
  a log or the plan. Only a pid whose command line names this config is stopped;
- mode `external`: the config is written and, if the proxy answers, its
  liveliness checked; restarting it is its owner's business;
- mode `container` (`ContainerGateway`): the proxy is a managed container on the
  gateway's node (`homelab-gateway`, labelled `homelab.cluster`, `homelab.node`,
  `homelab.role=gateway` and `homelab.spec-hash`, network host), serving
  `--config /etc/homelab-litellm/config.yaml --host H --port P`. Its config (and the
  files next to it) is in the labelled volume `homelab-gateway`, mounted read-only:
  written by a short-lived helper container (temporary name, rename, the previous
  file kept as NAME.bak) and read back through one that never starts. A restart
  re-creates the container, so it gets the current image, arguments and key. The
  master key is resolved at that moment and handed to Docker as the container's
  environment variable that the config names (`os.environ/NAME`) — how LiteLLM
  reads its key. It is never in the command line, a label, the plan, the events or
  a log; but Docker keeps a container's environment, and `docker inspect` on the
  node shows it to whoever may use that Docker engine (who could read any of the
  node's secrets anyway). (LocalGateway refuses mode container: its files belong on
  the gateway's node, not this machine's disk.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from controller.core.state import (
    GATEWAY_CONFIG,
    GATEWAY_CONTAINER,
    GATEWAY_ROLE,
    GATEWAY_VOLUME,
    LABEL_CLUSTER,
    LABEL_NODE,
    LABEL_ROLE,
    GatewayState,
    gateway_container,
)
from controller.drivers.base import DockerNode, DriverError
from controller.drivers.httpjson import BadAnswer, read_capped
from controller.drivers.poll import POLL_BYTES, poll_200
from controller.drivers.secrets import Redactor, resolve_secret
from specs.files import atomic_write

PID_FILE = "litellm.pid"
LOG_FILE = "litellm.log"
LIVELINESS = "/health/liveliness"


def _answers(url: str, timeout: float) -> bool:
    """One GET, bounded in time and size: 200 or not (the proxy's /health/liveliness)."""
    try:
        with httpx.Client(trust_env=False) as client:
            return read_capped(client, "GET", url, what=url, deadline=timeout, max_bytes=POLL_BYTES)[0] == 200
    except (httpx.HTTPError, BadAnswer):
        return False


def _not_live(desired: GatewayState, timeout: float, last: str) -> DriverError:
    return DriverError(f"gateway: {desired.url}{LIVELINESS} did not answer 200 within {timeout:g}s (last: {last})")


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class LocalGateway:
    """The gateway on this machine: a config file, and the proxy process for mode `process`."""

    def __init__(self, desired: GatewayState, state_dir: Path, *, timeout: float = 2.0) -> None:
        self.desired = desired
        self.state_dir = state_dir
        self.timeout = timeout

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE

    def read_config(self) -> str | None:
        path = Path(self.desired.path).expanduser()
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        for name, want in self.desired.files:
            try:
                have: str | None = (path.parent / name).read_text()
            except FileNotFoundError:
                have = None
            if have != want:  # the config alone would look in sync: make the difference seen
                text += f"# {name} next to this file is {'missing' if have is None else 'not the one rendered'}\n"
        return text

    def alive(self) -> bool:
        return _answers(self.desired.url + LIVELINESS, self.timeout)

    def write_config(self, desired: GatewayState) -> None:
        assert desired.text is not None
        if desired.mode == "container":
            # Its file belongs on the gateway's node, next to its container: not this machine's disk.
            raise DriverError("gateway mode container is not supported yet: use mode process or external")
        path = Path(desired.path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for name, text in desired.files:  # first: the config names them
                atomic_write(path.parent / name, text, keep_previous=False)
            atomic_write(path, desired.text)
        except OSError as exc:
            raise DriverError(f"gateway config {path}: cannot write: {exc.strerror}") from None

    def _our_pid(self, desired: GatewayState) -> int | None:
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        args = _cmdline(pid)
        if _pid_alive(pid) and "--config" in args and desired.path in args:
            return pid
        return None

    def stop(self, desired: GatewayState, timeout: float = 10.0) -> None:
        """Stop the proxy homelab started for this config (SIGTERM, then SIGKILL); others are left alone."""
        pid = self._our_pid(desired)
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    return
                time.sleep(0.05)
        raise DriverError(f"gateway: the proxy (pid {pid}) did not stop")

    def restart(self, desired: GatewayState) -> None:
        if desired.mode != "process":
            raise DriverError(f"gateway mode {desired.mode}: restarting the proxy is not supported yet")
        key = resolve_secret(desired.key_ref)
        self.stop(desired)
        env = dict(os.environ)
        env[desired.key_env] = key
        env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the cost map at start
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / LOG_FILE, "ab") as log:
            try:
                proc = subprocess.Popen(
                    list(desired.command),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise DriverError(f"gateway: cannot start {desired.command[0]}: {exc.strerror}") from None
        atomic_write(self.pid_file, f"{proc.pid}\n", keep_previous=False)

    def wait_live(self, desired: GatewayState, timeout: float) -> None:
        pid = self._our_pid(desired) if desired.mode == "process" else None
        if desired.mode == "process" and pid is None:
            raise DriverError(f"gateway: the proxy is not running; see {self.state_dir / LOG_FILE}")

        def exited() -> None:
            if pid is not None and not _pid_alive(pid):
                tail = self._log_tail()
                raise DriverError(f"gateway: the proxy exited while starting{': ' + tail if tail else ''}")

        last = poll_200(
            desired.url + LIVELINESS,
            timeout,
            request_timeout=self.timeout,
            between=exited,
            # mode external, not reachable from here: the owner of the proxy restarts and checks it
            error_is_ok=lambda exc: desired.mode == "external" and isinstance(exc, httpx.ConnectError),
        )
        if last is not None:
            raise _not_live(desired, timeout, last)

    def container_hash(self) -> str:
        return ""  # no container: mode process or external

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.state_dir / LOG_FILE).read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


class ContainerGateway:
    """mode container: the proxy in a managed container on the gateway's node, its config in a volume there."""

    def __init__(self, desired: GatewayState, docker: DockerNode, cluster: str, *, timeout: float = 2.0) -> None:
        self.desired = desired
        self.docker = docker
        self.cluster = cluster
        self.timeout = timeout
        self._redact = Redactor()

    def read_config(self) -> str | None:
        names = [GATEWAY_CONFIG, *(name for name, _ in self.desired.files)]
        got = self.docker.read_volume_files(GATEWAY_VOLUME, names)
        text = got.get(GATEWAY_CONFIG)
        if text is None:
            return None
        for name, want in self.desired.files:
            have = got.get(name)
            if have != want:  # the config alone would look in sync: make the difference seen
                text += f"# {name} next to this file is {'missing' if have is None else 'not the one rendered'}\n"
        return text

    def container_hash(self) -> str:
        got = self.docker.service_status(GATEWAY_CONTAINER)
        return got[1] if got is not None else ""

    def alive(self) -> bool:
        got = self.docker.service_status(GATEWAY_CONTAINER)
        if got is None or got[0] != "running":
            return False
        return _answers(self.desired.url + LIVELINESS, self.timeout)

    def write_config(self, desired: GatewayState) -> None:
        assert desired.text is not None
        labels = {LABEL_CLUSTER: self.cluster, LABEL_NODE: self.docker.node, LABEL_ROLE: GATEWAY_ROLE}
        # The files the config names first, the config last.
        self.docker.write_volume_files(GATEWAY_VOLUME, [*desired.files, (GATEWAY_CONFIG, desired.text)], labels)

    def restart(self, desired: GatewayState) -> None:
        """Re-create the container: LiteLLM reads its config (and its key) only at start."""
        key = resolve_secret(desired.key_ref)
        self._redact.add(key)
        env = {desired.key_env: key, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no cost-map download at start
        self.docker.run_service(gateway_container(desired), env)

    def wait_live(self, desired: GatewayState, timeout: float) -> None:
        def container_gone() -> None:
            got = self.docker.service_status(GATEWAY_CONTAINER)
            if got is None or got[0] not in ("created", "running", "restarting"):
                tail = ""
                with contextlib.suppress(DriverError):
                    logs = self.docker.container_logs(GATEWAY_CONTAINER, tail=3) if got is not None else ""
                    tail = " | ".join(line.strip() for line in self._redact(logs).strip().splitlines())
                state = "does not exist" if got is None else got[0]
                raise DriverError(
                    f"gateway: the proxy's container on node {self.docker.node} {state}"
                    + (f"; last log lines: {tail}" if tail else "")
                )

        last = poll_200(desired.url + LIVELINESS, timeout, request_timeout=self.timeout, between=container_gone)
        if last is not None:
            raise _not_live(desired, timeout, last)
