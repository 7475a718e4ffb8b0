"""`homelab recover` against a real OpenSSH server and a real Docker engine (issue 8).

The stand-ins, all on this machine (the "node" is 127.0.0.2):

- SSH: a private sshd (tests/support/sshd.py) on 127.0.0.2 with a fresh host key
  and key-only login; the client key's sessions get a PATH whose first directory
  holds stand-ins for `sudo` and `systemctl`.
- `sudo` stand-in: like `sudo -S`, reads the password from the first line of
  stdin, compares it with the expected one (a 0600 file), sleeps a moment (so a
  sampler of /proc sees the processes) and runs the rest of its arguments.
- `systemctl restart docker` stand-in: asks the test to restart the test's
  private dockerd (a request file a watcher thread of the test acts on; the
  fixture owns the daemon so it is always cleaned up), and waits until it is up.
- "Docker down" is that dockerd stopped; "machine asleep" is the sshd stopped
  (sessions killed) and the dockerd stopped; "wake up" is a UDP listener on
  127.0.0.1 that receives the magic packet (the spec's broadcast is the explicit
  loopback address) — or the wake command, which writes a request file — and
  starts both again.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.drivers.docker import DockerEngine
from controller.drivers.wake import magic_packet
from controller.effects.apply import EVENTS_FILE, Executor
from controller.effects.engine import CachingConnect
from controller.effects.recovery import STATE_FILE
from solver.place import SolveParams
from specs import parse_spec
from specs.model import ClusterSpec
from tests.support import dockerd as dockerd_support
from tests.support import images
from tests.support import sshd as sshd_support
from tests.support.ports import free_port_range
from tests.support.synth import shape_by_name, write_synth_gguf
from tests.support.wiring import prepare

ADDRESS = "127.0.0.2"
MAC = "02:00:00:00:00:02"
PASSWORD = "pw-Zq8v!-never-shown"

SUDO = """#!/bin/sh
# stand-in for `sudo -S CMD...`: the password is the first line of stdin
[ "$1" = "-S" ] && shift
IFS= read -r given
sleep 0.5
if [ "$given" != "$(cat {expected})" ]; then echo "sudo: 1 incorrect password attempt" >&2; exit 1; fi
exec "$@"
"""

SYSTEMCTL = """#!/bin/sh
# stand-in for `systemctl restart docker`: the test restarts its private dockerd
[ "$1 $2" = "restart docker" ] || {{ echo "systemctl stand-in: only 'restart docker'" >&2; exit 1; }}
touch {requests}/docker
i=0
while [ -e {requests}/docker ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ ! -e {requests}/docker ]
"""


class Lab:
    def __init__(self, root: Path, server: sshd_support.Sshd, daemon: dockerd_support.Dockerd) -> None:
        self.root = root
        self.server = server
        self.daemon = daemon
        self.requests = root / "requests"
        self.requests.mkdir()
        bin_dir = root / "bin"
        bin_dir.mkdir()
        self.expected = root / "expected-password"
        self.expected.write_text(PASSWORD + "\n")
        self.expected.chmod(0o600)
        self.password_file = root / "sudo-password"  # the spec's secret: file:, 0600
        self.password_file.write_text(PASSWORD + "\n")
        self.password_file.chmod(0o600)
        for name, text in (
            ("sudo", SUDO.format(expected=self.expected)),
            ("systemctl", SYSTEMCTL.format(requests=self.requests)),
        ):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.key = server.add_client_key("node", {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"})
        self.strangers = root / "empty_known_hosts"
        self.strangers.write_text("")
        self.wol_port = 0
        self.woken: list[bytes] = []
        self._stop = threading.Event()
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(("127.0.0.1", 0))
        self._udp.settimeout(0.1)
        self.wol_port = self._udp.getsockname()[1]
        self._threads = [
            threading.Thread(target=self._watch, daemon=True),
            threading.Thread(target=self._listen, daemon=True),
        ]
        for t in self._threads:
            t.start()

    # -- the "machine"

    def sleep_node(self) -> None:
        self.server.stop()
        self.daemon.stop()

    def boot(self) -> None:
        if self.server._proc is None:
            self.server.start()
        self.daemon.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for name in ("docker", "wake"):
                request = self.requests / name
                if request.exists():
                    self.daemon.start() if name == "docker" else self.boot()
                    request.unlink()
            time.sleep(0.05)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self._udp.recvfrom(1024)
            except TimeoutError:
                continue
            except OSError:
                return
            self.woken.append(data)
            if data == magic_packet(MAC):
                self.boot()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._udp.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    for why in (sshd_support.available(), dockerd_support.available()):
        if why is not None:
            if os.environ.get("HOMELAB_REQUIRE_REAL"):
                pytest.fail(f"a real sshd and dockerd are required here: {why}")
            pytest.skip(why)
    root = tmp_path_factory.mktemp("recovery")
    with sshd_support.Sshd([ADDRESS]) as server, dockerd_support.Dockerd() as daemon:
        lab = Lab(root, server, daemon)
        try:
            yield lab
        finally:
            lab.close()
            if daemon.running:
                client = daemon.client()
                for c in client.containers.list(all=True):
                    c.remove(force=True)
                client.close()


class World:
    def __init__(self, lab: Lab, tmp: Path, image: str, helper: str, gguf: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.state = tmp / "state"
        self.port = free_port_range(4, ADDRESS)
        self.fields = {"image": image, "helper": helper, "gguf": gguf, "base": self.port, "top": self.port + 3}

    def text(self, *, known_hosts: Path | None = None, wake: str | None = None, attempts: int = 2) -> str:
        lab = self.lab
        wake = wake or f'{{wol: {{mac: "{MAC}", broadcast: 127.0.0.1, port: {lab.wol_port}}}}}'
        return f"""\
cluster: {{name: rec}}
secrets:
  sudo: file:{lab.password_file}
nodes:
  - name: box
    tier: remote
    address: {ADDRESS}
    ssh: {{user: {lab.server.user}, port: {lab.server.port}, key_file: {lab.key},
           known_hosts: {known_hosts or lab.server.known_hosts}, connect_timeout: 3s, sudo_password: "secret:sudo"}}
    docker: {{endpoint: "{lab.daemon.url}", gpu_access: none, timeout: 5s}}
    gpus: [{{index: 0, name: declared card, vram: 8GiB}}]
    ram: 16GiB
    llamacpp:
      image: "{self.fields["image"]}"
      helper_image: "{self.fields["helper"]}"
      ports: {self.fields["base"]}-{self.fields["top"]}
      bind_address: {ADDRESS}
      threads: 1
      volume: hl-rec
      health_timeout: 60s
    wake: {wake}
models:
  - name: alpha
    runtime: llamacpp
    source: {{gguf: {self.fields["gguf"]}}}
    context: 512
health: {{timeout: 2s}}
recovery: {{attempts: {attempts}, backoff: {{initial: 0.2s, max: 1s}}, wait_ssh: 20s, wait_docker: 40s}}
"""

    def write(self, **kw: object) -> Path:
        path = self.tmp / "cluster.yaml"
        path.write_text(self.text(**kw))  # type: ignore[arg-type]
        return path

    def spec(self) -> ClusterSpec:
        return parse_spec(self.text(), "cluster.yaml").spec

    def converge(self) -> None:
        spec = self.spec()
        connect = CachingConnect(lambda node: DockerEngine(node, "rec", poll_interval=0.05))
        prepared = prepare(spec, connect, SolveParams(time_limit=5, workers=1))
        result = Executor("rec", dict(connect.opened), self.state, health_timeout={"box": 60}).apply(prepared.plan)
        for d in connect.opened.values():
            d.close()  # type: ignore[attr-defined]
        assert result.ok, result.summary()

    def serving(self) -> bool:
        try:
            return httpx.get(f"http://{ADDRESS}:{self.port}/health", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.state / EVENTS_FILE).read_text().splitlines()]


@pytest.fixture
def world(lab: Lab, tmp_path: Path) -> Iterator[World]:
    client = lab.daemon.client()
    try:
        image, helper = images.llamacpp_image(client), images.busybox_image(client)
    finally:
        client.close()
    gguf = write_synth_gguf(tmp_path / "tiny.gguf", shape_by_name("mha-f16"))
    w = World(lab, tmp_path, image, helper, gguf)
    w.converge()
    assert w.serving()
    yield w
    lab.boot()  # whatever the test did, the node is up again for the next one
    client = lab.daemon.client()
    for c in client.containers.list(all=True):
        c.remove(force=True)
    for v in client.volumes.list():
        v.remove(force=True)
    client.close()


class CmdlineSampler:
    """Reads every process's command line and environment while recovery runs: the secret must be in none."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.leaks: list[str] = []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                for what in ("cmdline", "environ"):
                    if what == "environ" and entry.name == me:
                        continue  # the test itself knows the password
                    try:
                        data = (entry / what).read_bytes()
                    except OSError:
                        continue
                    if self.secret in data:
                        self.leaks.append(f"{entry.name}/{what}: {data[:200]!r}")
                    if what == "cmdline":
                        self.seen.add(data.replace(b"\0", b" ").decode(errors="replace"))
            time.sleep(0.01)

    def __enter__(self) -> CmdlineSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_docker_down_is_restarted_with_sudo_over_ssh_and_containers_come_back(world: World) -> None:
    lab = world.lab
    client = lab.daemon.client()
    client.containers.get("homelab-alpha").stop(timeout=1)  # it crashed, then Docker went down
    client.close()
    lab.daemon.stop()
    assert not world.serving()
    spec = world.write()
    code, out, err = cli("recover", "box", "--dry-run", "-f", str(spec), "--state-dir", str(world.state))
    assert code == 0, err
    port = lab.server.port
    assert "node box: SSH up, Docker down" in out
    assert (
        f"  1. restart-docker: run `sudo -S systemctl restart docker` on root@{ADDRESS}:{port},"
        " sudo password from secret:sudo on stdin  (SSH answers but Docker does not: restart Docker)" in out
    )
    assert "  2. wait-docker: wait up to 40 s" in out and "  3. restart-containers:" in out
    assert "  then: done" in out and not lab.daemon.running  # a dry run changes nothing

    with CmdlineSampler(PASSWORD) as sampler:
        code, out, err = cli("recover", "box", "-f", str(spec), "--state-dir", str(world.state), "--json")
    assert code == 0, out + err
    assert sampler.leaks == []
    assert any("systemctl restart docker" in c for c in sampler.seen)  # it sampled while the command ran
    result = json.loads(out)["nodes"][0]
    assert result["status"] == "recovered" and result["message"] == "node box: recovered (attempt 1)"
    assert [s["step"] for s in result["steps"]] == [
        "probe",
        "restart-docker",
        "wait-docker",
        "restart-containers",
        "recheck",
    ]
    assert "start-container homelab-alpha" in result["steps"][3]["detail"]
    assert world.serving()
    events = world.events()
    assert PASSWORD not in (world.state / EVENTS_FILE).read_text() and PASSWORD not in out + err
    observed = [e["step"] for e in events if e["event"] == "recovery-observed"]
    assert observed == ["probe", "restart-docker", "wait-docker", "restart-containers", "recheck"]
    assert ("step-done", "wait-healthy") in {(e["event"], e.get("step")) for e in events}  # health-gated start


def test_a_wrong_sudo_password_fails_with_the_secret_masked(world: World) -> None:
    lab = world.lab
    lab.daemon.stop()
    wrong = "wrong-pw-Q7-never-shown"
    original = lab.password_file.read_text()
    lab.password_file.write_text(wrong + "\n")
    try:
        with CmdlineSampler(wrong) as sampler:
            code, out, err = cli("recover", "box", "-f", str(world.write(attempts=1)), "--state-dir", str(world.state))
    finally:
        lab.password_file.write_text(original)
    assert code == 1
    assert sampler.leaks == []
    assert "the Docker restart command failed: exit 1: sudo: 1 incorrect password attempt" in err
    assert "marked failed, will retry in 1.0 s" in err
    assert wrong not in out + err + (world.state / EVENTS_FILE).read_text()


@pytest.mark.parametrize("how", ["wol", "command"])
def test_a_sleeping_node_is_woken_and_recovered(world: World, how: str) -> None:
    lab = world.lab
    lab.sleep_node()
    before = len(lab.woken)
    # the command gets the plug's password (here: the sudo secret) on stdin, never on its command line
    check = f'read -r p; [ "$p" = "$(cat {lab.expected})" ] && touch {lab.requests}/wake'
    wake = f"{{command: '{check}', stdin: 'secret:sudo'}}" if how == "command" else None
    spec = world.write(wake=wake)
    code, out, err = cli("recover", "box", "--dry-run", "-f", str(spec), "--state-dir", str(world.state))
    assert code == 0, err
    assert "node box: SSH down, Docker down" in out
    first = out.splitlines()[1]
    if how == "wol":
        assert first.startswith(f"  1. wake: send a Wake-on-LAN packet for {MAC} to 127.0.0.1:{lab.wol_port}")
    else:
        assert first.startswith(f"  1. wake: run the wake command `{check}` here, secret:sudo on its stdin")
    assert "  2. wait-ssh: wait up to 20 s for SSH" in out and lab.server._proc is None

    code, out, err = cli("recover", "box", "-f", str(spec), "--state-dir", str(world.state))
    assert code == 0, out + err
    assert "node box: recovered (attempt 1)" in out
    if how == "wol":
        assert lab.woken[before:] == [magic_packet(MAC)]
    steps = [e["step"] for e in world.events() if e["event"] == "recovery-observed"]
    assert steps[-6:] == ["probe", "wake", "wait-ssh", "wait-docker", "restart-containers", "recheck"]
    assert world.serving()
    assert PASSWORD not in out + err + (world.state / EVENTS_FILE).read_text()


def test_an_unknown_host_key_stops_recovery(world: World) -> None:
    lab = world.lab
    client = lab.daemon.client()
    client.containers.get("homelab-alpha").stop(timeout=1)
    client.close()
    lab.daemon.stop()
    spec = world.write(known_hosts=lab.strangers)
    code, out, err = cli("recover", "box", "-f", str(spec), "--state-dir", str(world.state))
    assert code == 1
    port = lab.server.port
    assert (
        f"node box: recovery stopped: node box: ssh root@{ADDRESS}:{port}: host key not trusted: it is not in"
        f" {lab.strangers}, or it changed; check it, then add it (ssh-keyscan -p {port} {ADDRESS} >> {lab.strangers});"
        " giving up until the spec or the node changes"
    ) in err
    assert not lab.daemon.running and not (lab.requests / "docker").exists()  # nothing was done
    record = json.loads((world.state / STATE_FILE).read_text())["box"]
    assert record["status"] == "gave-up" and record["next_retry"] is None
    # the watch-loop form (no node named) leaves it alone until the spec changes
    code, out, err = cli("recover", "-f", str(spec), "--state-dir", str(world.state))
    assert "giving up until the spec or the node changes" in err and "nothing to recover" in out


def test_bounded_attempts_with_backoff_then_marked_failed(world: World) -> None:
    lab = world.lab
    lab.sleep_node()
    spec = world.write(wake="{command: 'echo no plug here >&2; exit 3'}", attempts=3)
    start = time.monotonic()
    code, _, err = cli("recover", "box", "-f", str(spec), "--state-dir", str(world.state))
    assert code == 1
    assert "attempt 1 of 3 failed (wake-up failed: wake command: exit 3: no plug here); will retry in" in err
    assert "attempt 2 of 3 failed" in err
    assert "node box: recovery failed after 3 attempts (wake-up failed: wake command: exit 3: no plug here);" in err
    assert "marked failed, will retry in 1.0 s" in err
    assert time.monotonic() - start >= 0.2 * 0.8 + 0.4 * 0.8  # it backed off between attempts
    record = json.loads((world.state / STATE_FILE).read_text())["box"]
    assert record["status"] == "failed" and record["attempts"] == 3 and record["next_retry"] > time.time()
    retries = [e for e in world.events() if e["event"] == "recovery-retry"]
    assert [e["attempt"] for e in retries] == [1, 2] and retries[0]["delay"] < retries[1]["delay"] * 1.5
