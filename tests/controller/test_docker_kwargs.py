"""The Docker driver's pure parts: container create arguments (GPU wiring) and unreachable reasons.

No daemon is needed; `docker run --gpus` cannot work on the test machine, so this is
where the NVIDIA device request is checked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from controller.core.state import (
    LABEL_CLUSTER,
    LABEL_CONFIG,
    LABEL_HASH,
    LABEL_MODEL,
    LABEL_NODE,
    LABEL_REPLICA,
    ContainerConfig,
    ContainerState,
    health_url,
)
from controller.drivers.base import DriverError
from controller.drivers.docker import DockerEngine, container_create_kwargs, ssh_host_port, unreachable_reason
from specs.model import Node


def _desired(gpus: tuple[int, ...], access: str, labels: dict[str, str] | None = None) -> ContainerState:
    config = ContainerConfig(
        image="llama.cpp:server",
        command=("-m", "/models/m.gguf", "--port", "3000"),
        model_file="m.gguf",
        context=4096,
        gpu_layers=99 if gpus else 0,
        port=3000,
        alias="m",
        cache_type="f16",
        gpus=gpus,
        gpu_access=access,
        volume="homelab-models",
    )
    return ContainerState(
        name="homelab-m",
        node="gpu1",
        model="m",
        replica=0,
        config=config,
        config_hash=config.digest(),
        health_url="http://10.0.0.2:3000/health",
        labels={LABEL_CLUSTER: "lab"} if labels is None else labels,
    )


def test_common_arguments() -> None:
    kwargs = container_create_kwargs(_desired((), "none"))
    assert kwargs["image"] == "llama.cpp:server"
    assert kwargs["command"] == ["-m", "/models/m.gguf", "--port", "3000"]
    assert kwargs["name"] == "homelab-m"
    assert kwargs["mounts"] == [{"Target": "/models", "Source": "homelab-models", "Type": "volume", "ReadOnly": True}]
    assert kwargs["network_mode"] == "host"
    assert kwargs["restart_policy"] == {"Name": "unless-stopped"}
    assert kwargs["init"] is True
    assert "device_requests" not in kwargs and "devices" not in kwargs


def test_missing_labels_are_filled_from_the_state() -> None:
    desired = _desired((), "none")
    labels = container_create_kwargs(desired)["labels"]
    assert desired.config is not None
    assert labels[LABEL_CLUSTER] == "lab"
    assert (labels[LABEL_NODE], labels[LABEL_MODEL], labels[LABEL_REPLICA]) == ("gpu1", "m", "0")
    assert labels[LABEL_HASH] == desired.config.digest()
    assert ContainerConfig.from_json(json.loads(labels[LABEL_CONFIG])) == desired.config


def test_given_labels_win() -> None:
    labels = {LABEL_CLUSTER: "lab", LABEL_HASH: "abc", "homelab.extra": "x"}
    assert container_create_kwargs(_desired((), "none", labels))["labels"][LABEL_HASH] == "abc"
    assert container_create_kwargs(_desired((), "none", labels))["labels"]["homelab.extra"] == "x"


@pytest.mark.parametrize(
    ("gpus", "access", "expected"),
    [
        (
            (0,),
            "nvidia",
            {
                "device_requests": [
                    {"Driver": "nvidia", "Count": 0, "DeviceIDs": ["0"], "Capabilities": [["gpu"]], "Options": {}}
                ]
            },
        ),
        (
            (1, 3),
            "nvidia",
            {
                "device_requests": [
                    {"Driver": "nvidia", "Count": 0, "DeviceIDs": ["1", "3"], "Capabilities": [["gpu"]], "Options": {}}
                ]
            },
        ),
        ((0,), "dri", {"devices": ["/dev/dri:/dev/dri:rwm"]}),
        ((0,), "none", {}),
        ((), "nvidia", {}),
        ((), "dri", {}),
    ],
)
def test_gpu_access(gpus: tuple[int, ...], access: str, expected: dict[str, Any]) -> None:
    kwargs = container_create_kwargs(_desired(gpus, access))
    got = {k: kwargs[k] for k in ("device_requests", "devices") if k in kwargs}
    assert got == expected


def test_refusals() -> None:
    with pytest.raises(DriverError, match=r"without the homelab\.cluster label"):
        container_create_kwargs(_desired((), "none", labels={}))
    with pytest.raises(DriverError, match="unknown gpu_access 'rocm'"):
        container_create_kwargs(_desired((0,), "rocm"))
    desired = _desired((), "none")
    no_config = ContainerState(desired.name, desired.node, desired.model, 0, None, "", "")
    with pytest.raises(DriverError, match="no configuration"):
        container_create_kwargs(no_config)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            ConnectionError("('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))"),
            "no such socket /run/x.sock",
        ),
        (
            ConnectionError("('Connection aborted.', ConnectionRefusedError(111, 'Connection refused'))"),
            "connection refused",
        ),
        (
            TimeoutError("HTTPConnectionPool(host='h', port=1): Read timed out. (read timeout=10)"),
            "timed out after 10 s",
        ),
        (OSError("Install paramiko package to enable ssh:// support"), "ssh:// endpoints need the paramiko package"),
        (OSError("[Errno -2] Name or service not known"), "cannot resolve the host name"),
        (OSError("something\nodd   happened"), "OSError: something odd happened"),
    ],
)
def test_unreachable_reason(error: Exception, reason: str) -> None:
    got = unreachable_reason(error, endpoint="unix:///run/x.sock", timeout=10)
    assert got.startswith(reason)
    assert "\n" not in got


def test_reason_follows_the_cause_chain() -> None:
    try:
        try:
            raise FileNotFoundError(2, "No such file or directory")
        except FileNotFoundError as inner:
            raise RuntimeError("Error while fetching server API version") from inner
    except RuntimeError as outer:
        assert unreachable_reason(outer, endpoint="unix:///s", timeout=1) == "no such socket /s"


def test_health_url() -> None:
    assert health_url("10.0.0.2", 3000) == "http://10.0.0.2:3000/health"
    assert health_url("fd00::2", 3000) == "http://[fd00::2]:3000/health"


def test_engine_construction_does_not_connect() -> None:
    for endpoint in ("unix:///nowhere.sock", "tcp://192.0.2.1:2375", "ssh://me@192.0.2.1"):
        node = Node.model_validate(
            {
                "name": "n",
                "tier": "cpu",
                "address": "192.0.2.1",
                "ram": "1GiB",
                "docker": {"endpoint": endpoint, "timeout": 3},
                "llamacpp": {"image": "i", "ports": "3000-3001"},
            }
        )
        engine = DockerEngine(node, "lab")
        assert (engine.node, engine.endpoint, engine.timeout, engine.helper_image) == (
            "n",
            endpoint,
            3.0,
            "busybox:latest",
        )


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("ssh://me@host", ("host", 22)),
        ("ssh://me@host:2222", ("host", 2222)),
        ("ssh://host", ("host", 22)),
        ("ssh://me@[::1]:2022", ("::1", 2022)),
        ("ssh://[fe80::1]", ("fe80::1", 22)),
    ],
)
def test_ssh_host_port(endpoint: str, expected: tuple[str, int]) -> None:
    assert ssh_host_port(endpoint) == expected
