"""Fixtures for tests against real components: one private dockerd for the session, and its images.

The daemon, its mounts and its files are gone when the session ends, even after
a failure; every test's containers and volumes are removed after the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from controller.drivers.docker import DockerEngine
from specs.model import Node
from tests.support import dockerd as dockerd_support
from tests.support import images
from tests.support.synth import shape_by_name, write_synth_gguf


def pytest_configure(config: pytest.Config) -> None:
    # docker-py leaks its unix socket when connect() fails (docker/transport/unixconn.py closes it
    # nowhere); the ResourceWarning surfaces whenever the garbage collector gets to it, so the
    # tests of an unreachable engine cannot scope this to themselves.
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:Exception ignored in. <socket\.socket fd=\d+, family=(1|AddressFamily\.AF_UNIX),"
        ":pytest.PytestUnraisableExceptionWarning",
    )
    # The same for ssh:// endpoints (use_ssh_client): docker/transport/sshconn.py leaves the failed
    # `ssh` child, its pipe and its socket to the garbage collector.
    for leaked in (
        r"<docker\.transport\.sshconn\.SSHSocket",
        r"<function Popen\.__del__",
        r"<_io\.FileIO name=\d+ mode='wb'",
    ):
        config.addinivalue_line(
            "filterwarnings", rf"ignore:Exception ignored in. {leaked}:pytest.PytestUnraisableExceptionWarning"
        )


@pytest.fixture(scope="session")
def dockerd() -> Iterator[dockerd_support.Dockerd]:
    why = dockerd_support.available()
    if why is not None:
        if os.environ.get("HOMELAB_REQUIRE_REAL"):  # set by .ci/run: there, a skip would hide a broken setup
            pytest.fail(f"a real dockerd is required here: {why}")
        pytest.skip(why)
    with dockerd_support.Dockerd() as daemon:
        yield daemon


@pytest.fixture(scope="session")
def docker_client(dockerd: dockerd_support.Dockerd) -> Iterator[docker.DockerClient]:
    client = dockerd.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    return images.busybox_image(docker_client)


@pytest.fixture(scope="session")
def llamacpp_image(docker_client: docker.DockerClient) -> str:
    return images.llamacpp_image(docker_client)


@pytest.fixture(scope="session")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (synthetic) GGUF that llama-server loads in a fraction of a second."""
    return write_synth_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", shape_by_name("mha-f16"))


@pytest.fixture
def cluster() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def make_node(endpoint: str, *, helper_image: str = "busybox:latest", image: str = "llama:none") -> Node:
    return Node.model_validate(
        {
            "name": "n1",
            "tier": "cpu",
            "address": "127.0.0.1",
            "ram": "8GiB",
            "docker": {"endpoint": endpoint, "gpu_access": "none", "timeout": 10},
            "llamacpp": {"image": image, "ports": "20000-20099", "helper_image": helper_image},
        }
    )


@pytest.fixture
def engine(
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    busybox_image: str,
    cluster: str,
) -> Iterator[DockerEngine]:
    """A DockerEngine on the session daemon; containers and volumes the test made are removed afterwards."""
    containers_before = {c.id for c in docker_client.containers.list(all=True)}
    volumes_before = {v.name for v in docker_client.volumes.list()}
    eng = DockerEngine(make_node(dockerd.url, helper_image=busybox_image), cluster, poll_interval=0.05)
    try:
        yield eng
    finally:
        eng.close()
        for container in docker_client.containers.list(all=True):
            if container.id not in containers_before:
                container.remove(force=True)
        for volume in docker_client.volumes.list():
            if volume.name not in volumes_before:
                volume.remove(force=True)


LITELLM_ENV = "HOMELAB_LITELLM"
"""Path of the `litellm` executable of a virtualenv with `litellm[proxy]==1.108.7` and `prisma`."""


@pytest.fixture(scope="session")
def litellm_bin() -> str:
    """The real LiteLLM proxy (installed apart from the project, so its pins don't fight ours)."""
    path = os.environ.get(LITELLM_ENV, "")
    why = None
    if not path:
        why = f"${LITELLM_ENV} is not set (path of `litellm` from a venv with 'litellm[proxy]==1.108.7' prisma)"
    elif not os.access(path, os.X_OK):
        why = f"${LITELLM_ENV}={path} is not an executable"
    if why is not None:
        if os.environ.get("HOMELAB_REQUIRE_REAL"):
            pytest.fail(f"a real LiteLLM proxy is required here: {why}")
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def litellm_image(docker_client: docker.DockerClient, litellm_bin: str) -> str:
    """The real LiteLLM proxy of $HOMELAB_LITELLM's venv as an image (tests/support/images.py; ~0.8 GB)."""
    return images.litellm_image(docker_client)
