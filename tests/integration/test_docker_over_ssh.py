"""`ssh://` Docker endpoints through a real sshd, with the spec's key file and known_hosts (drivers/sshdocker.py).

The node is 127.0.0.2 with a private sshd (tests/support/sshd.py); its sessions get DOCKER_HOST
pointing at the session's private dockerd, so `docker system dial-stdio` on the "node" reaches it, as
it would reach the node's own engine on a real machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.drivers.base import NodeUnreachable
from controller.drivers.docker import DockerEngine
from controller.effects.watch import FileSource, Metrics, WatchLoop, Worker
from specs.model import Node
from tests.support import dockerd as dockerd_support
from tests.support import sshd as sshd_support

ADDRESS = "127.0.0.2"


@pytest.fixture(scope="module")
def server(dockerd: dockerd_support.Dockerd) -> Iterator[tuple[sshd_support.Sshd, Path]]:
    why = sshd_support.available() or (None if shutil.which("docker") else "the docker CLI is not installed")
    if why is not None:
        if os.environ.get("HOMELAB_REQUIRE_REAL"):
            pytest.fail(f"a real sshd and docker CLI are required here: {why}")
        pytest.skip(why)
    with sshd_support.Sshd([ADDRESS]) as s:
        key = s.add_client_key("docker", {"DOCKER_HOST": dockerd.url, "PATH": "/usr/local/bin:/usr/bin:/bin"})
        yield s, key


def node(server: sshd_support.Sshd, key: Path | None, known_hosts: Path, user_in_url: bool = True) -> Node:
    user = f"{server.user}@" if user_in_url else ""
    return Node.model_validate(
        {
            "name": "far",
            "tier": "remote",
            "address": ADDRESS,
            "ram": "8GiB",
            "docker": {"endpoint": f"ssh://{user}{ADDRESS}:{server.port}", "gpu_access": "none", "timeout": 10},
            "ssh": {
                "user": server.user,
                "port": server.port,
                "known_hosts": str(known_hosts),
                **({"key_file": str(key)} if key is not None else {}),
            },
            "llamacpp": {"image": "llama:none", "ports": "20000-20099"},
        }
    )


def test_the_engine_answers_through_ssh_with_the_specs_key_and_known_hosts(
    server: tuple[sshd_support.Sshd, Path], cluster: str
) -> None:
    s, key = server
    for user_in_url in (True, False):  # the user from the URL, else from ssh.user
        with DockerEngine(node(s, key, s.known_hosts, user_in_url), cluster) as eng:
            eng.ping()
            assert eng.list_containers(cluster) is not None
            assert eng.list_volumes(cluster) is not None
            proxy_dir = eng._proxy.dir if eng._proxy is not None else None
            assert proxy_dir is not None and proxy_dir.exists()
        assert not proxy_dir.exists()  # the local socket goes with the engine


def test_an_unknown_host_key_is_refused_in_one_line(
    server: tuple[sshd_support.Sshd, Path], cluster: str, tmp_path: Path
) -> None:
    s, key = server
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with DockerEngine(node(s, key, empty), cluster) as eng, pytest.raises(NodeUnreachable) as err:
        eng.ping()
    message = str(err.value)
    assert "\n" not in message and "Host key verification failed" in message, message
    assert empty.read_text() == ""  # never added


def test_a_key_the_node_does_not_accept_is_refused_in_one_line(
    server: tuple[sshd_support.Sshd, Path], cluster: str, tmp_path: Path
) -> None:
    s, _ = server
    stranger = tmp_path / "stranger"
    sshd_support.keygen(stranger, "stranger")
    with DockerEngine(node(s, stranger, s.known_hosts), cluster) as eng, pytest.raises(NodeUnreachable) as err:
        eng.ping()
    message = str(err.value)
    assert "\n" not in message and "Permission denied" in message, message


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _proxy_dirs() -> int:
    return len(list(Path(tempfile.gettempdir()).glob("hl-ssh-*")))


def test_a_watch_over_ssh_keeps_threads_fds_and_temp_dirs_flat(
    server: tuple[sshd_support.Sshd, Path], cluster: str, tmp_path: Path, busybox_image: str
) -> None:
    """200 watch intervals against an ssh:// engine: each reconcile's Session closes what it opened (the SSH
    tunnel's accept thread, its socket and its temporary directory), so nothing grows with the intervals."""
    s, key = server
    far = node(s, key, s.known_hosts).model_dump(mode="json", exclude_none=True)
    far["llamacpp"]["helper_image"] = busybox_image  # the plan copies a file: its helper must be on the node
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        json.dumps(
            {
                "cluster": {"name": cluster},
                "nodes": [far],
                "models": [
                    {
                        "name": "tiny",
                        "runtime": "llamacpp",
                        "source": {"gguf": "/models/tiny.gguf"},
                        "context": 512,
                        "memory": {"vram": "0", "ram": "64MiB"},
                        "placement": {"cpu_only": True},
                    }
                ],
            }
        )
    )
    said: list[str] = []
    worker = Worker(FileSource(spec), tmp_path / "state", True, Metrics(), lambda line, _: said.append(line))
    loop = WatchLoop(worker, lambda: 0.0, write_status=False, settle=0.0)

    async def intervals(n: int) -> None:
        await loop.run(max_runs=loop.runs + n)

    asyncio.run(intervals(10))  # warm up: imports, the first connections, thread pools
    threads, fds, dirs = threading.active_count(), _open_fds(), _proxy_dirs()
    asyncio.run(intervals(200))
    assert loop.runs == 210, said
    assert worker.good is not None, said
    assert worker.last.get("ok"), worker.last
    assert "+ container homelab-tiny" in worker.last["plan"]["text"]  # the engine was really asked each time
    assert (threading.active_count(), _proxy_dirs()) == (threads, dirs)
    assert _open_fds() <= fds + 2, f"open file descriptors grew from {fds} to {_open_fds()}"
