"""The CPU each node's estimates are for: the spec's `cpu:`, this machine's for a node that is this machine, else
assumed (the kind that needs the most RAM); and `homelab place` saying which, where it matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.drivers.fake import FakeDockerNode
from controller.effects.hostcpu import host_cpus, is_this_machine, local_cpu_flags, local_cpu_kind
from solver.cpu import CpuKind
from solver.estimate import EstimateParams, estimate, shape_from_header
from solver.explain import gib
from solver.gguf import read_header
from solver.profiles import CpuSource, PlannedCpu, planned_cpus
from specs.load import parse_spec
from specs.model import ClusterSpec
from tests.support.synth import shape_by_name, write_synth_gguf
from tests.support.wiring import Wired

AMX = frozenset({"fpu", "avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"})
AVX2 = frozenset({"fpu", "avx", "avx2"})
GIB = 2**30


def _spec(nodes: str, models: str = "models: []\n") -> ClusterSpec:
    return parse_spec("cluster: {name: t}\nnodes:\n" + nodes + models, "cluster.yaml").spec


def _node(name: str, address: str, extra: str = "", docker: str = "") -> str:
    return (
        f"  - name: {name}\n    tier: cpu\n    address: {address}\n    ram: 16GiB\n{extra}"
        f'    docker: {{endpoint: "{docker or f"tcp://{address}:2375"}"}}\n'
        "    llamacpp: {image: llama, ports: 3000-3009}\n"
    )


NODES = (
    _node("here", "127.0.0.1")  # loopback, no ssh: this machine
    + _node("sock", "192.168.1.5", docker="unix:///var/run/docker.sock")  # its engine is here
    + _node("stated", "127.0.0.1", "    cpu: {features: [avx2]}\n")  # this machine, but the spec says
    + _node("over-ssh", "127.0.0.2", "    ssh: {user: u}\n", "ssh://u@127.0.0.2")  # over SSH: another machine
    + _node("tcp", "192.168.1.6")
)


def test_which_nodes_are_this_machine() -> None:
    spec = _spec(NODES)
    assert [n.name for n in spec.nodes if is_this_machine(n)] == ["here", "sock", "stated"]


def test_planned_cpus_spec_then_local_host_then_assumed() -> None:
    spec = _spec(NODES)
    reads: list[int] = []

    def read() -> frozenset[str]:
        reads.append(1)
        return AMX

    assert host_cpus(spec, read) == {
        "here": PlannedCpu(CpuKind.X86_AMX, CpuSource.LOCAL_HOST),
        "sock": PlannedCpu(CpuKind.X86_AMX, CpuSource.LOCAL_HOST),
        "stated": PlannedCpu(CpuKind.X86_AVX2, CpuSource.SPEC),
        "over-ssh": PlannedCpu(CpuKind.UNKNOWN, CpuSource.ASSUMED),
        "tcp": PlannedCpu(CpuKind.UNKNOWN, CpuSource.ASSUMED),
    }
    assert reads == [1]  # read once
    # Flags that cannot be read (macOS has no /proc/cpuinfo): nothing known, as for a remote node.
    assert host_cpus(spec, frozenset)["here"] == PlannedCpu(CpuKind.UNKNOWN, CpuSource.ASSUMED)
    # No node is this machine without a `cpu:`: the flags are not read at all.
    remote = _spec(_node("tcp", "192.168.1.6"))
    host_cpus(remote, read)
    assert reads == [1]
    assert planned_cpus(spec) == {  # the core alone: the spec, else assumed
        **{n: PlannedCpu(CpuKind.UNKNOWN, CpuSource.ASSUMED) for n in ("here", "sock", "over-ssh", "tcp")},
        "stated": PlannedCpu(CpuKind.X86_AVX2, CpuSource.SPEC),
    }


@pytest.fixture
def cpu_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A spec with one node that is this machine (no GPU) and a CPU-only llama.cpp model (Q8_0 matrices: an AMX
    copy on a Xeon with AMX, none on other x86 CPUs), in the working directory."""
    gguf = write_synth_gguf(tmp_path / "m.gguf", shape_by_name("mha-q8"))
    (tmp_path / "cluster.yaml").write_text(
        "cluster: {name: t}\nnodes:\n"
        + _node("here", "127.0.0.1")
        + f"models:\n  - name: m\n    runtime: llamacpp\n    source: {{gguf: {gguf}}}\n    context: 1024\n"
    )
    monkeypatch.chdir(tmp_path)
    return gguf


def _ram(gguf: Path, kind: CpuKind) -> int:
    params = EstimateParams(ctx=1024, gpu=False, cpu=kind)
    return estimate(shape_from_header(read_header(gguf)), 0, params).total_cpu


@pytest.mark.parametrize(
    ("flags", "kind"), [(AMX, CpuKind.X86_AMX), (AVX2, CpuKind.X86_AVX2), (frozenset(), CpuKind.UNKNOWN)]
)
def test_place_plans_the_ram_of_this_machines_cpu(
    cpu_model: Path, wired: Wired, flags: frozenset[str], kind: CpuKind
) -> None:
    wired.set(host_cpu=lambda: flags)
    code, out, err = wired.run("place", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["assignments"][0]["ram_bytes"] == _ram(cpu_model, kind)
    source = "assumed" if kind is CpuKind.UNKNOWN else "local host"
    assert doc["cpus"] == {"here": {"kind": kind.value, "source": source}}
    code, out, _ = wired.run("place")
    line = next(x for x in out.splitlines() if x.startswith("  m on here:"))
    if kind is CpuKind.UNKNOWN:
        assert line.endswith(
            "(CPU assumed: the kind that needs the most RAM; state cpu: or run homelab discover --write)"
        )
    else:
        assert line.endswith(f"(CPU {kind.value} from the local host)")
    assert _ram(cpu_model, CpuKind.X86_AMX) > _ram(cpu_model, CpuKind.X86_AVX2)  # the case tells them apart


def test_place_on_this_machine_reads_its_real_cpu(cpu_model: Path, wired: Wired) -> None:
    """No seam replaced: the figure follows the CPU the test runs on (read from /proc/cpuinfo here too)."""
    assert local_cpu_flags(), "no CPU flags in /proc/cpuinfo"
    code, out, err = wired.run("place", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["cpus"]["here"] == {"kind": local_cpu_kind().value, "source": "local host"}
    assert doc["assignments"][0]["ram_bytes"] == _ram(cpu_model, local_cpu_kind())


def test_a_stated_cpu_wins_over_this_machines(cpu_model: Path, wired: Wired) -> None:
    spec = Path("cluster.yaml")
    spec.write_text(spec.read_text().replace("    ram: 16GiB\n", "    ram: 16GiB\n    cpu: {features: [avx2]}\n"))
    wired.set(host_cpu=lambda: AMX)
    code, out, _ = wired.run("place")
    assert code == 0
    assert f"  m on here: {gib(_ram(cpu_model, CpuKind.X86_AVX2))} RAM (CPU x86-avx2 from the spec)" in out


@pytest.mark.parametrize("flags", [AMX, AVX2])
def test_reconcile_plans_with_the_same_cpu_as_place(
    cpu_model: Path, wired: Wired, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]
) -> None:
    fake = FakeDockerNode("here", images={"llama"})
    wired.set(connect=lambda spec: lambda node: fake, gpu_probe=lambda nodes: {}, host_cpu=lambda: flags)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    code, out, err = wired.run("reconcile", "--dry-run", "--json")
    assert code == 2, err
    planned = json.loads(out)["placement"]["assignments"]
    code, out, _ = wired.run("place", "--json")
    assert planned == json.loads(out)["assignments"]
    kind = CpuKind.X86_AMX if flags == AMX else CpuKind.X86_AVX2
    assert planned[0]["ram_bytes"] == _ram(cpu_model, kind)
