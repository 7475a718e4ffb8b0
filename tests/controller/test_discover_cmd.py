"""`homelab discover`: what it prints, and `--write` editing only the keys it must (fake probe)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from controller.commands import discover as discover_cmd
from controller.drivers.gpu import GpuInfo, GpuProcess, NodeGpus
from specs.model import Node
from tests.support.wiring import Wired

GIB = 2**30
MIB = 2**20

SPEC = """\
# yaml-language-server: $schema=./homelab.schema.json
cluster: {name: lab}   # the lab

nodes:
  # the big one
  - name: box
    tier: local
    address: 127.0.0.1
    docker: {endpoint: "unix:///tmp/none.sock"}
    gpus:
      - index: 0          # top slot
        name: 'RTX 3090'
        vram: 24GiB       # as sold
        reserve: 1GiB
    ram: 64GiB   # more later
    llamacpp: {image: "llama:test", ports: 3000-3009}

  - name: nas
    tier: cpu
    address: 127.0.0.3
    ram: 16GiB
    ollama: {url: "http://127.0.0.3:11434"}
models: []   # none yet
"""

BOX = NodeGpus(
    "box",
    (
        GpuInfo(0, "NVIDIA GeForce RTX 3090", "GPU-a", 24576 * MIB, 1 * GIB, 23 * GIB, "550.1"),
        GpuInfo(1, "NVIDIA GeForce RTX 3060", "GPU-b", 12288 * MIB, 0, 12 * GIB, "550.1"),
    ),
    (GpuProcess(422, "python3", 1 * GIB, "GPU-a"),),
    65_758_372 * 1024,
)


class Probe:
    def __init__(self, reports: Mapping[str, NodeGpus]) -> None:
        self.reports = reports
        self.asked: list[list[str]] = []

    def __call__(self, nodes: Sequence[Node]) -> Mapping[str, NodeGpus]:
        self.asked.append([n.name for n in nodes])
        return {n.name: self.reports[n.name] for n in nodes if n.name in self.reports}


@pytest.fixture
def spec_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wired: Wired) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    wired.set(gpu_probe=Probe({"box": BOX, "nas": NodeGpus("nas", ram_bytes=16 * GIB)}))
    return path


def test_prints_gpus_ram_and_the_diff_without_writing(spec_file: Path, wired: Wired) -> None:
    code, out, err = wired.run("discover")
    assert code == 0, err
    assert "node box (127.0.0.1, local):" in out
    assert "  GPU 0  NVIDIA GeForce RTX 3090  24.0 GiB total, 23.0 GiB free  driver 550.1  GPU-a" in out
    assert "    process 422 python3: 1.0 GiB" in out
    assert "  RAM 62.7 GiB" in out
    assert "node nas (127.0.0.3, local):\n  no NVIDIA GPUs\n  RAM 16.0 GiB" in out
    assert "Would change cluster.yaml (--write to apply):" in out
    assert "\n-    ram: 64GiB   # more later\n" in out and "\n+    ram: 64217MiB # more later\n" in out
    assert spec_file.read_text() == SPEC


def test_write_changes_only_the_edited_keys(spec_file: Path, wired: Wired) -> None:
    code, _, err = wired.run("discover", "--write", "--yes")
    assert code == 0, err
    assert "wrote cluster.yaml (previous version kept as" in err
    after = spec_file.read_text()
    assert (spec_file.parent / "cluster.yaml.bak").read_text() == SPEC
    assert after == SPEC.replace(
        "        name: 'RTX 3090'\n",
        "        name: 'NVIDIA GeForce RTX 3090'\n",  # the user's quoting kept
    ).replace(
        "        reserve: 1GiB\n",
        "        reserve: 1GiB\n"
        "        uuid: GPU-a\n"
        "      - index: 1\n"
        "        name: NVIDIA GeForce RTX 3060\n"
        "        vram: 12GiB\n"
        "        uuid: GPU-b\n",
    ).replace("    ram: 64GiB   # more later\n", "    ram: 64217MiB # more later\n")  # the comment keeps its column
    code, out, _ = wired.run("discover")  # a second run finds nothing to change
    assert code == 0 and "cluster.yaml already says what the nodes have." in out


def test_write_asks_and_refuses_without_a_terminal(spec_file: Path, wired: Wired) -> None:
    code, _, err = wired.run("discover", "--write")
    assert code == 1
    assert err.strip().endswith("error: not writing without confirmation: run in a terminal or pass --yes")
    assert spec_file.read_text() == SPEC


def test_some_nodes_fail_the_others_report(spec_file: Path, monkeypatch: pytest.MonkeyPatch, wired: Wired) -> None:
    probe = Probe({"box": BOX, "nas": NodeGpus("nas", error="node nas: ssh root@127.0.0.3:22: connection refused")})
    wired.set(gpu_probe=probe)
    code, out, err = wired.run("discover", "box", "nas")
    assert code == 1
    assert "node box (127.0.0.1, local):" in out
    assert err == "error: node nas: ssh root@127.0.0.3:22: connection refused\n"


def test_unknown_node(spec_file: Path, wired: Wired) -> None:
    code, _, err = wired.run("discover", "nope")
    assert code == 1 and err == "error: unknown node nope (nodes: box, nas)\n"


def test_missing_gpu_is_left_in_the_file(spec_file: Path, monkeypatch: pytest.MonkeyPatch, wired: Wired) -> None:
    wired.set(gpu_probe=Probe({"box": NodeGpus("box", (), (), 64 * GIB)}))
    code, out, _ = wired.run("discover", "box")
    assert code == 0
    assert "node box: GPU 0 (RTX 3090) is in the spec but not on the node; left in the file" in out


def test_flow_style_gpu_lists_stay_flow(tmp_path: Path) -> None:
    from specs.load import dump_document, parse_spec

    text = SPEC.replace(
        "    gpus:\n      - index: 0          # top slot\n        name: 'RTX 3090'\n"
        "        vram: 24GiB       # as sold\n        reserve: 1GiB\n",
        "    gpus: [{index: 0, name: NVIDIA GeForce RTX 3090, vram: 24GiB}]  # one card\n",
    )
    loaded = parse_spec(text, "c.yaml")
    discover_cmd.apply_discovery(loaded.document, loaded.spec, {"box": BOX})
    assert (
        "    gpus: [{index: 0, name: NVIDIA GeForce RTX 3090, vram: 24GiB, uuid: GPU-a}, {index: 1, name: NVIDIA"
        " GeForce RTX 3060, vram: 12GiB, uuid: GPU-b}] # one card\n" in dump_document(loaded.document)
    )


@pytest.mark.parametrize(
    ("cpuinfo", "written", "kind"),
    [
        ("Features\t: fp asimd evtstrm aes asimddp sha512", "[asimd, asimddp]", "arm-dotprod"),
        ("flags\t\t: fpu sse sse2 ssse3", "[]", "plain"),  # none of the flags that decide: plain, not unknown
        (
            "flags\t\t: fpu avx avx2 avx512f avx512_vnni amx_tile amx_int8",
            "[avx2, avx512f, avx512_vnni, amx_int8]",
            "x86-amx",
        ),
    ],
)
def test_write_states_the_cpu_in_the_flags_that_decide(
    spec_file: Path, wired: Wired, cpuinfo: str, written: str, kind: str
) -> None:
    wired.set(gpu_probe=Probe({"nas": NodeGpus("nas", ram_bytes=16 * GIB, cpuinfo=cpuinfo)}))
    code, out, err = wired.run("discover", "nas", "--write", "--yes")
    assert code == 0, err
    assert f"node nas (127.0.0.3, local):\n  no NVIDIA GPUs\n  RAM 16.0 GiB\n  CPU {kind} (" in out
    assert spec_file.read_text() == SPEC.replace(
        "    ram: 16GiB\n", f"    ram: 16GiB\n    cpu: {{features: {written}}}\n"
    )
    code, out, _ = wired.run("discover", "nas")  # a second run finds nothing to change
    assert code == 0 and "cluster.yaml already says what the nodes have." in out
