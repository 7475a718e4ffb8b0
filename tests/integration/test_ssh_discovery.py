"""GPU discovery over a real OpenSSH server on loopback, with a stand-in `nvidia-smi` on the session's PATH.

The test machine has no GPU: each client key's sessions get their own PATH
(authorized_keys `environment=`), holding the stand-in of
`tests/support/nvidia_smi.py` that prints the real H100 captures — or garbage,
or nothing at all — so discovery runs through the same SSH path as in
production. RAM and CPU features are the test machine's real /proc/meminfo and
/proc/cpuinfo, read over SSH (the expectations are read from the same files here).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.drivers.base import CommandFailed
from controller.drivers.gpu import parse_meminfo
from controller.drivers.ssh import SshShell
from controller.effects.hostcpu import local_cpu_flags, local_cpu_kind
from solver.cpu import kind_flags
from solver.profiles import node_cpu_kind
from specs.load import load_spec
from specs.model import Node
from tests.support import sshd as sshd_support
from tests.support.nvidia_smi import write_stand_in
from tests.support.ports import free_port

MIB = 2**20


class Lab:
    def __init__(self, server: sshd_support.Sshd, root: Path) -> None:
        self.server = server
        base = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        write_stand_in(root / "gpu")
        write_stand_in(root / "garbage", gpu="index, name\nthis is not csv at all\n")  # a header, then junk
        write_stand_in(root / "nodriver", exit_status=9)
        self.keys = {
            "gpu": server.add_client_key("gpu", {"PATH": f"{root / 'gpu'}:{base}"}),
            "garbage": server.add_client_key("garbage", {"PATH": f"{root / 'garbage'}:{base}"}),
            "nodriver": server.add_client_key("nodriver", {"PATH": f"{root / 'nodriver'}:{base}"}),
            "plain": server.add_client_key("plain", {"PATH": base}),
        }
        self.strangers = root / "empty_known_hosts"
        self.strangers.write_text("")

    def node_yaml(
        self, name: str, address: str, key: str, *, port: int | None = None, known: Path | None = None
    ) -> str:
        return (
            f"  - name: {name}\n"
            "    tier: local\n"
            f"    address: {address}\n"
            f"    ssh: {{user: {self.server.user}, port: {port or self.server.port}, key_file: {self.keys[key]},"
            f" known_hosts: {known or self.server.known_hosts}, connect_timeout: 5s}}\n"
            "    gpus:\n"
            "      - {index: 0, name: some GPU, vram: 80GiB}   # guessed\n"
            "    ram: 8GiB  # guessed\n"
            f"    ollama: {{url: 'http://{address}:11434'}}\n"
        )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = sshd_support.available()
    if why is not None:
        if os.environ.get("HOMELAB_REQUIRE_REAL"):
            pytest.fail(f"a real sshd is required here: {why}")
        pytest.skip(why)
    with sshd_support.Sshd(["127.0.0.2", "127.0.0.3"]) as server:
        yield Lab(server, tmp_path_factory.mktemp("stand-ins"))


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def real_ram_mib() -> int:
    return parse_meminfo(Path("/proc/meminfo").read_text()) // MIB


def test_discover_over_ssh_one_line_per_failing_node(lab: Lab, tmp_path: Path) -> None:
    refused_port = free_port("127.0.0.2")
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        "cluster: {name: lab}\nnodes:\n"
        + lab.node_yaml("gpu1", "127.0.0.2", "gpu")
        + lab.node_yaml("gpu2", "127.0.0.3", "gpu")
        + lab.node_yaml("garbled", "127.0.0.3", "garbage")
        + lab.node_yaml("nodriver", "127.0.0.2", "nodriver")
        + lab.node_yaml("cpuonly", "127.0.0.2", "plain")
        + lab.node_yaml("refused", "127.0.0.2", "gpu", port=refused_port)
        + lab.node_yaml("stranger", "127.0.0.3", "gpu", known=lab.strangers)
    )
    code, out, err = run("discover", "-f", str(spec))
    assert code == 1
    gpu_line = (
        "  GPU 0  NVIDIA H100 80GB HBM3  79.6 GiB total, 72.7 GiB free  driver 580.159.04"
        "  GPU-1ea1fc07-69c3-37aa-17cf-8a81ad018c96\n    process 422 python3: 6.5 GiB\n"
    )
    assert f"node gpu1 (127.0.0.2, ssh):\n{gpu_line}" in out
    assert f"node gpu2 (127.0.0.3, ssh):\n{gpu_line}" in out
    assert f"  RAM {real_ram_mib() * MIB / 2**30:.1f} GiB" in out
    port = lab.server.port
    assert err.splitlines() == [  # in the spec's order, one line each
        "error: node garbled: nvidia-smi --query-gpu: line 1: expected 8 fields, got 1: 'this is not csv at all'",
        "error: node nodriver: nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate"
        " with the NVIDIA driver.",
        "error: node cpuonly: nvidia-smi not found",
        f"error: node refused: ssh root@127.0.0.2:{refused_port}: connection refused",
        f"error: node stranger: ssh root@127.0.0.3:{port}: host key not trusted: it is not in {lab.strangers},"
        f" or it changed; check it, then add it (ssh-keyscan -p {port} 127.0.0.3 >> {lab.strangers})",
    ]
    assert "Would change" in out and spec.read_text().count("guessed") == 14


def test_discover_write_over_ssh_keeps_the_rest_of_the_file(lab: Lab, tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    original = "# my lab\ncluster: {name: lab}\n\nnodes:   # one for now\n" + lab.node_yaml("gpu1", "127.0.0.2", "gpu")
    spec.write_text(original)
    code, _, err = run("discover", "gpu1", "--write", "--yes", "-f", str(spec))
    assert code == 0, err
    expected = original.replace(
        "      - {index: 0, name: some GPU, vram: 80GiB}   # guessed\n",
        "      - {index: 0, name: NVIDIA H100 80GB HBM3, vram: 81559MiB,"
        " uuid: GPU-1ea1fc07-69c3-37aa-17cf-8a81ad018c96} # guessed\n",
    ).replace(
        "    ram: 8GiB  # guessed\n",
        f"    ram: {real_ram_mib()}MiB # guessed\n    cpu: {{features: [{', '.join(kind_flags(local_cpu_flags()))}]}}"
        "\n",
    )
    assert spec.read_text() == expected
    assert Path(f"{spec}.bak").read_text() == original
    assert node_cpu_kind(load_spec(spec).spec.node("gpu1")) is local_cpu_kind()  # the planner now knows this CPU


def test_discover_reads_the_cpu_over_ssh_and_keeps_a_spec_that_says_the_same(lab: Lab, tmp_path: Path) -> None:
    flags = kind_flags(local_cpu_flags())
    spec = tmp_path / "cluster.yaml"
    spec.write_text("cluster: {name: lab}\nnodes:\n" + lab.node_yaml("cpu1", "127.0.0.2", "plain"))
    code, out, err = run("discover", "--json", "-f", str(spec))
    assert code == 1 and err.startswith("error: node cpu1: nvidia-smi not found")  # the CPU is read all the same
    node = json.loads(out)["nodes"]["cpu1"]
    first = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Feat")))
    assert node["cpuinfo"] == first.strip()
    assert node["cpu_features"] == flags and node["cpu_kind"] == local_cpu_kind().value
    assert "+    cpu: {features: [" in json.loads(out)["spec_diff"]
    # Every flag of /proc/cpuinfo, in another order and case, decides the same kind: nothing to change.
    everything = ", ".join(sorted((f.upper() for f in local_cpu_flags()), reverse=True))
    stated = lab.node_yaml("cpu1", "127.0.0.2", "plain").replace(
        "    ram: 8GiB  # guessed\n", f"    ram: {real_ram_mib()}MiB\n    cpu: {{features: [{everything}]}}\n"
    )
    spec.write_text("cluster: {name: lab}\nnodes:\n" + stated)
    code, out, _ = run("discover", "-f", str(spec))
    assert f"  CPU {local_cpu_kind().value} ({' '.join(flags) or 'none of avx2, asimd'})\n" in out
    assert f"{spec} already says what the nodes have." in out


def test_ssh_shell_runs_commands_with_stdin_and_timeout(lab: Lab) -> None:
    node = Node.model_validate(
        {
            "name": "n",
            "tier": "local",
            "address": "127.0.0.2",
            "ram": "1GiB",
            "ollama": {"url": "http://127.0.0.2:11434"},
            "ssh": {
                "user": lab.server.user,
                "port": lab.server.port,
                "key_file": str(lab.keys["plain"]),
                "known_hosts": str(lab.server.known_hosts),
            },
        }
    )

    async def go() -> None:
        async with SshShell(node) as shell:
            result = await shell.run(["sh", "-c", "cat; echo oops >&2; exit 3"], stdin=b"secret\n")
            assert (result.exit_status, result.stdout, result.stderr) == (3, b"secret\n", b"oops\n")
            with pytest.raises(CommandFailed, match=r"^node n: sleep timed out after 0.3 s \(over ssh\)$"):
                await shell.run(["sleep", "5"], timeout=0.3)

    asyncio.run(go())
