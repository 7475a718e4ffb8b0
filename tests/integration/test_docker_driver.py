"""The Docker driver against a real dockerd (private, on a unix socket) and a real llama-server image."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path

import docker
import httpx
import pytest

from controller.core.state import (
    LABEL_CLUSTER,
    LABEL_CONFIG,
    LABEL_HASH,
    LABEL_MODEL,
    LABEL_NODE,
    LABEL_REPLICA,
    LABEL_ROLE,
    LABEL_WRITES,
    MODELS_MOUNT,
    ContainerConfig,
    ContainerState,
)
from controller.drivers.base import DriverError, NodeUnreachable, NotManaged, VerifyFailed
from controller.drivers.docker import DockerEngine
from tests.integration.conftest import make_node
from tests.support.dockerd import Dockerd
from tests.support.ports import free_port

VOLUME = "homelab-models"


def _labels(cluster: str) -> dict[str, str]:
    return {LABEL_CLUSTER: cluster}


def _one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message


def _ours(client: docker.DockerClient, cluster: str) -> list[str]:
    """Names of the containers labelled with `cluster`, helpers included."""
    return [c.name for c in client.containers.list(all=True, filters={"label": f"{LABEL_CLUSTER}={cluster}"})]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _volume_listing(client: docker.DockerClient, image: str, volume: str) -> list[str]:
    """Every name in the volume, hidden ones included, read without the driver."""
    out = client.containers.run(
        image,
        ["sh", "-c", "ls -a /models"],
        remove=True,
        network_mode="none",
        volumes={volume: {"bind": "/models", "mode": "ro"}},
    )
    return sorted(n for n in bytes(out).decode().split() if n not in (".", ".."))


def _desired(cluster: str, image: str, file: str, port: int, *, name: str = "homelab-tiny") -> ContainerState:
    command = (
        "-m",
        f"{MODELS_MOUNT}/{file}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        "512",
        "-t",
        "1",
        "--alias",
        "tiny-chat",
        "--no-warmup",
    )
    config = ContainerConfig(
        image=image,
        command=command,
        model_file=file,
        context=512,
        gpu_layers=0,
        port=port,
        alias="tiny-chat",
        cache_type="f16",
        gpus=(),
        gpu_access="none",
        volume=VOLUME,
        restart_policy="no",
    )
    digest = config.digest()
    labels = {
        LABEL_CLUSTER: cluster,
        LABEL_NODE: "n1",
        LABEL_MODEL: "tiny",
        LABEL_REPLICA: "0",
        LABEL_HASH: digest,
        LABEL_CONFIG: json.dumps(config.to_json(), sort_keys=True, separators=(",", ":")),
    }
    return ContainerState(
        name=name,
        node="n1",
        model="tiny",
        replica=0,
        config=config,
        config_hash=digest,
        health_url=f"http://127.0.0.1:{port}/health",
        labels=labels,
    )


def _wait_healthy(url: str, timeout: float = 60.0) -> list[int]:
    """Poll /health until 200; return the status codes seen (503 while loading)."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            try:
                code = http.get(url).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.append(code)
            if code == 200:
                return seen
            time.sleep(0.05)
    raise AssertionError(f"{url} not healthy within {timeout} s (saw {seen[-5:]})")


# ---------------------------------------------------------------------- reachability


def test_ping_answers(engine: DockerEngine) -> None:
    engine.ping()


def test_missing_socket_is_unreachable(tmp_path: Path, cluster: str) -> None:
    with DockerEngine(make_node(f"unix://{tmp_path}/none.sock"), cluster, timeout=2) as eng:
        with pytest.raises(NodeUnreachable, match="no such socket") as err:
            eng.ping()
        _one_line(str(err.value))
        # every call says unreachable, never "empty"
        with pytest.raises(NodeUnreachable):
            eng.list_containers(cluster)
        with pytest.raises(NodeUnreachable):
            eng.list_volumes(cluster)


def test_refused_socket_is_unreachable(cluster: str) -> None:
    path = f"/tmp/hl-refused-{os.getpid()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)  # bound, never listening: connect() is refused
        with DockerEngine(make_node(f"unix://{path}"), cluster, timeout=2) as eng:
            with pytest.raises(NodeUnreachable, match="connection refused") as err:
                eng.ping()
            _one_line(str(err.value))
    finally:
        sock.close()
        os.unlink(path)


def test_silent_tcp_endpoint_times_out(cluster: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts into the backlog, never answers
        port = listener.getsockname()[1]
        with DockerEngine(make_node(f"tcp://127.0.0.1:{port}"), cluster, timeout=0.5) as eng:
            with pytest.raises(NodeUnreachable, match=re.escape("timed out after 0.5 s")) as err:
                eng.ping()
            _one_line(str(err.value))


def test_ssh_endpoint_constructs_and_fails_in_one_line(cluster: str) -> None:
    port = free_port()  # nothing listens there
    eng = DockerEngine(make_node(f"ssh://nobody@127.0.0.1:{port}"), cluster, timeout=3)
    assert eng.endpoint.startswith("ssh://")
    with eng, pytest.raises(NodeUnreachable) as err:
        eng.ping()
    _one_line(str(err.value))


def test_docker_down_then_back(busybox_image: str, docker_client: docker.DockerClient, cluster: str) -> None:
    """A daemon that stops is unreachable (not empty); when it is back the same engine works again."""
    with Dockerd() as daemon, DockerEngine(make_node(daemon.url), cluster, timeout=3) as eng:
        eng.create_volume(VOLUME, _labels(cluster))
        daemon.stop()
        with pytest.raises(NodeUnreachable, match="no such socket"):
            eng.list_volumes(cluster)
        daemon.start()
        assert [v.name for v in eng.list_volumes(cluster)] == [VOLUME]


# ---------------------------------------------------------------------- volumes and files


def test_volumes_are_listed_by_cluster(engine: DockerEngine, docker_client: docker.DockerClient, cluster: str) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    engine.create_volume(VOLUME, _labels(cluster))  # again: no error
    docker_client.volumes.create("someone-elses")
    docker_client.volumes.create("other-cluster", labels={LABEL_CLUSTER: "other"})
    assert [(v.node, v.name) for v in engine.list_volumes(cluster)] == [("n1", VOLUME)]
    assert engine.list_files(VOLUME) == []
    with pytest.raises(NotManaged):
        engine.create_volume("someone-elses", _labels(cluster))
    with pytest.raises(DriverError, match=re.escape("without the homelab.cluster label")):
        engine.create_volume("unlabelled", {})


def test_copy_file_verifies_and_renames(
    engine: DockerEngine, docker_client: docker.DockerClient, busybox_image: str, small_gguf: Path, cluster: str
) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    size = small_gguf.stat().st_size
    calls: list[tuple[int, int]] = []
    checksum = _sha256(small_gguf).upper()
    got = engine.copy_file(VOLUME, str(small_gguf), "tiny.gguf", sha256=checksum, progress=lambda *a: calls.append(a))
    assert got == size
    assert calls and calls[-1] == (size, size)
    assert all(t == size for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    files = engine.list_files(VOLUME)
    assert [(f.node, f.volume, f.name, f.size) for f in files] == [("n1", VOLUME, "tiny.gguf", size)]
    assert _volume_listing(docker_client, busybox_image, VOLUME) == ["tiny.gguf"]
    assert not _ours(docker_client, cluster), "helper containers are removed"


def test_copy_progress_is_reported_while_copying(
    engine: DockerEngine, tmp_path: Path, docker_client: docker.DockerClient, cluster: str
) -> None:
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 192)  # 192 MiB: long enough for a few polls
    engine.create_volume(VOLUME, _labels(cluster))
    calls: list[tuple[int, int]] = []
    assert engine.copy_file(VOLUME, str(big), "big.gguf", progress=lambda d, t: calls.append((d, t))) == 192 << 20
    assert calls[-1] == (192 << 20, 192 << 20)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_checksum_mismatch_leaves_nothing(
    engine: DockerEngine, docker_client: docker.DockerClient, busybox_image: str, small_gguf: Path, cluster: str
) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    with pytest.raises(VerifyFailed, match="sha256") as err:
        engine.copy_file(VOLUME, str(small_gguf), "tiny.gguf", sha256="0" * 64)
    _one_line(str(err.value))
    assert engine.list_files(VOLUME) == []
    assert _volume_listing(docker_client, busybox_image, VOLUME) == [], "no final file and no partial file"
    assert not _ours(docker_client, cluster)


def test_copy_follows_symlinks_out_of_the_directory(engine: DockerEngine, tmp_path: Path, cluster: str) -> None:
    """Like a Hugging Face cache: snapshots/REV/model.gguf -> ../../blobs/HASH."""
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_bytes(b"GGUF" + b"\0" * 1000)
    snap = tmp_path / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "model.gguf").symlink_to("../../blobs/abc123")
    engine.create_volume(VOLUME, _labels(cluster))
    assert engine.copy_file(VOLUME, str(snap / "model.gguf"), "model.gguf", sha256=_sha256(blob)) == 1004
    assert [(f.name, f.size) for f in engine.list_files(VOLUME)] == [("model.gguf", 1004)]


def test_copy_errors_are_one_line(engine: DockerEngine, tmp_path: Path, small_gguf: Path, cluster: str) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    cases = [
        (VOLUME, str(tmp_path / "absent.gguf"), "a.gguf", "not a regular file"),
        (VOLUME, str(tmp_path / "no-dir" / "absent.gguf"), "a.gguf", "no directory"),
        (VOLUME, str(small_gguf), ".hidden", "not a valid model file name"),
        (VOLUME, "relative.gguf", "a.gguf", "absolute path"),
        ("no-such-volume", str(small_gguf), "a.gguf", "no volume no-such-volume"),
    ]
    for volume, source, name, message in cases:
        with pytest.raises(DriverError, match=message) as err:
            engine.copy_file(volume, source, name)
        _one_line(str(err.value))
    assert not (tmp_path / "no-dir").exists(), "a bind mount must not create the source directory"


def test_remove_file(engine: DockerEngine, small_gguf: Path, cluster: str) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    engine.copy_file(VOLUME, str(small_gguf), "tiny.gguf")
    engine.remove_file(VOLUME, "tiny.gguf")
    engine.remove_file(VOLUME, "tiny.gguf")
    assert engine.list_files(VOLUME) == []


def _orphan(client: docker.DockerClient, image: str, cluster: str, labels: dict[str, str], script: str) -> str:
    """A helper container as a killed homelab leaves it (running `script` with the volume mounted at /models)."""
    container = client.containers.run(
        image,
        ["sh", "-c", script],
        detach=True,
        labels={LABEL_CLUSTER: cluster, LABEL_ROLE: "helper", **labels},
        network_mode="none",
        volumes={VOLUME: {"bind": "/models", "mode": "rw"}},
    )
    return str(container.name)


def test_a_killed_copys_helper_is_stopped_and_its_partial_removed_before_the_next_copy(
    engine: DockerEngine, docker_client: docker.DockerClient, busybox_image: str, small_gguf: Path, cluster: str
) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    writer = "while true; do echo x >> /models/.tiny.gguf.partial; echo y >> /models/.tiny.gguf.0a1b.partial;"
    orphan = _orphan(
        docker_client, busybox_image, cluster, {LABEL_WRITES: f"{VOLUME}/tiny.gguf"}, writer + " sleep 0.05; done"
    )
    other = _orphan(docker_client, busybox_image, cluster, {LABEL_WRITES: f"{VOLUME}/other.gguf"}, "sleep 600")
    size = small_gguf.stat().st_size
    assert engine.copy_file(VOLUME, str(small_gguf), "tiny.gguf", sha256=_sha256(small_gguf)) == size
    assert _ours(docker_client, cluster) == [other], "the writer of the same file is gone, no other"
    assert _volume_listing(docker_client, busybox_image, VOLUME) == ["tiny.gguf"]
    assert [(f.name, f.size) for f in engine.list_files(VOLUME)] == [("tiny.gguf", size)]
    assert orphan not in _ours(docker_client, cluster)


def test_clean_helpers_removes_finished_and_writing_helpers(
    engine: DockerEngine, docker_client: docker.DockerClient, busybox_image: str, cluster: str
) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    writing = _orphan(docker_client, busybox_image, cluster, {LABEL_WRITES: f"{VOLUME}/a.gguf"}, "sleep 600")
    reading = _orphan(docker_client, busybox_image, cluster, {}, "sleep 600")  # a `status` run's listing
    done = _orphan(docker_client, busybox_image, cluster, {}, "true")
    docker_client.containers.get(done).wait(timeout=30)
    other = _orphan(docker_client, busybox_image, "another", {LABEL_WRITES: f"{VOLUME}/a.gguf"}, "sleep 600")
    try:
        assert engine.clean_helpers() == sorted([writing, done])
        assert _ours(docker_client, cluster) == [reading]
        assert docker_client.containers.get(other).status == "running", "another cluster's helper is not ours"
    finally:
        docker_client.containers.get(other).remove(force=True)


def test_scan_files_sizes_sources_and_hash_files_hashes(
    engine: DockerEngine, tmp_path: Path, small_gguf: Path, cluster: str
) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    engine.copy_file(VOLUME, str(small_gguf), "tiny.gguf")
    (tmp_path / "link.gguf").symlink_to(small_gguf)
    sources = [str(small_gguf), str(tmp_path / "absent.gguf"), str(tmp_path / "link.gguf")]
    files, sizes = engine.scan_files(VOLUME, sources)
    size = small_gguf.stat().st_size
    assert [(f.name, f.size) for f in files] == [("tiny.gguf", size)] and files[0].mtime
    assert sizes == {str(small_gguf): size}  # a missing file and a link are not sized
    # a source whose directory is not on the node: the listing still answers, without sizes
    files, sizes = engine.scan_files(VOLUME, [str(tmp_path / "no-dir" / "m.gguf")])
    assert [f.name for f in files] == ["tiny.gguf"] and sizes == {}
    assert not (tmp_path / "no-dir").exists()
    assert engine.hash_files(VOLUME, ["tiny.gguf", "absent.gguf"]) == {"tiny.gguf": _sha256(small_gguf)}
    assert not _ours(engine.client, cluster)


def test_missing_helper_image_is_not_pulled(dockerd: Dockerd, cluster: str) -> None:
    with DockerEngine(make_node(dockerd.url, helper_image="busybox:missing"), cluster) as eng:
        eng.create_volume(VOLUME, _labels(cluster))
        message = "image busybox:missing is not on node n1; load it there first"
        with pytest.raises(DriverError, match=re.escape(message)):
            eng.list_files(VOLUME)
        eng.client.volumes.get(VOLUME).remove()
    assert "pull" not in dockerd.log_tail(20000).lower()


# ---------------------------------------------------------------------- containers


def test_llamacpp_container_serves_the_copied_model(
    engine: DockerEngine,
    llamacpp_image: str,
    small_gguf: Path,
    docker_client: docker.DockerClient,
    cluster: str,
) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    engine.copy_file(VOLUME, str(small_gguf), "tiny.gguf")
    port = free_port()
    desired = _desired(cluster, llamacpp_image, "tiny.gguf", port)
    engine.run_container(desired)

    seen = _wait_healthy(f"http://127.0.0.1:{port}/health")
    assert seen[-1] == 200 and set(seen) <= {200, 503}
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
    assert "tiny-chat" in [m["id"] for m in models["data"]]

    managed, foreign = engine.list_containers(cluster)
    assert foreign == []
    [observed] = managed
    assert observed.name == desired.name
    assert observed.config == desired.config
    assert observed.config_hash == desired.config_hash
    assert observed.labels == desired.labels
    assert (observed.node, observed.model, observed.replica) == ("n1", "tiny", 0)
    assert observed.health_url == desired.health_url
    assert (observed.status, observed.exit_code) == ("running", None)
    assert engine.list_containers("another-cluster") == ([], [])

    attrs = docker_client.containers.get(desired.name).attrs
    assert attrs["HostConfig"]["Init"] is True
    assert attrs["HostConfig"]["NetworkMode"] == "host"
    [mount] = attrs["Mounts"]
    assert (mount["Name"], mount["Destination"], mount["RW"]) == (VOLUME, MODELS_MOUNT, False)

    assert "listening on" in engine.container_logs(desired.name, tail=200)

    with pytest.raises(DriverError, match="already exists"):
        engine.run_container(desired)

    engine.remove_container(desired.name, timeout=2)
    assert engine.list_containers(cluster) == ([], [])
    engine.remove_container(desired.name)  # gone already: no error


def test_stopped_container_reports_exit_code(
    engine: DockerEngine, llamacpp_image: str, cluster: str, docker_client: docker.DockerClient
) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    desired = _desired(cluster, llamacpp_image, "absent.gguf", free_port())
    engine.run_container(desired)  # llama-server exits: the model file is not there
    deadline = time.monotonic() + 30
    while docker_client.containers.get(desired.name).status != "exited":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [observed], _ = engine.list_containers(cluster)
    assert observed.status == "exited"
    assert observed.exit_code not in (None, 0)
    assert "absent.gguf" in engine.container_logs(desired.name, tail=50)
    engine.start_container(desired.name)
    engine.remove_container(desired.name)


def test_missing_image_is_not_pulled(engine: DockerEngine, dockerd: Dockerd, cluster: str) -> None:
    engine.create_volume(VOLUME, _labels(cluster))
    desired = _desired(cluster, "llama.cpp:not-here", "tiny.gguf", free_port())
    with pytest.raises(DriverError, match=re.escape("image llama.cpp:not-here is not on node n1; load it there first")):
        engine.run_container(desired)
    assert engine.list_containers(cluster) == ([], [])
    assert "pull" not in dockerd.log_tail(20000).lower()


def test_foreign_containers_are_reported_and_never_touched(
    engine: DockerEngine, docker_client: docker.DockerClient, busybox_image: str, cluster: str
) -> None:
    docker_client.containers.run(busybox_image, ["sleep", "60"], name="users-own", detach=True, network_mode="none")
    docker_client.containers.create(
        busybox_image, ["true"], name="other-cluster", labels={LABEL_CLUSTER: "other"}, network_mode="none"
    )
    docker_client.containers.create(
        busybox_image,
        ["true"],
        name="homelab-broken",
        labels={LABEL_CLUSTER: cluster, LABEL_CONFIG: "{not json", LABEL_REPLICA: "x"},
        network_mode="none",
    )
    managed, foreign = engine.list_containers(cluster)
    assert foreign == ["users-own"]
    [broken] = managed
    assert (broken.name, broken.config, broken.replica, broken.status, broken.health_url) == (
        "homelab-broken",
        None,
        0,
        "created",
        "",
    )
    for name in ("users-own", "other-cluster"):
        with pytest.raises(NotManaged) as err:
            engine.remove_container(name)
        _one_line(str(err.value))
        with pytest.raises(NotManaged):
            engine.start_container(name)
    assert docker_client.containers.get("users-own").status == "running"
    engine.remove_container("homelab-broken")
    with pytest.raises(DriverError, match="no container"):
        engine.start_container("homelab-broken")


def test_gpu_container_that_cannot_start_is_not_left_behind(
    engine: DockerEngine, llamacpp_image: str, cluster: str, docker_client: docker.DockerClient
) -> None:
    """No NVIDIA runtime here: the start fails with one line and the created container is removed."""
    engine.create_volume(VOLUME, _labels(cluster))
    desired = _desired(cluster, llamacpp_image, "tiny.gguf", free_port())
    assert desired.config is not None
    config = ContainerConfig.from_json({**desired.config.to_json(), "gpus": [0], "gpu_access": "nvidia"})
    gpu = ContainerState(
        name=desired.name,
        node=desired.node,
        model=desired.model,
        replica=0,
        config=config,
        config_hash=config.digest(),
        health_url=desired.health_url,
        labels={**desired.labels, LABEL_CONFIG: json.dumps(config.to_json()), LABEL_HASH: config.digest()},
    )
    with pytest.raises(DriverError) as err:
        engine.run_container(gpu)
    _one_line(str(err.value))
    assert not _ours(docker_client, cluster)
