"""`homelab place` through a throwaway Typer app."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from controller.commands.place import register


def app() -> typer.Typer:
    a = typer.Typer()

    @a.callback()
    def _root() -> None:
        """Test root."""

    register(a)
    return a


def test_example_table(examples_dir: Path) -> None:
    r = CliRunner().invoke(app(), ["place", "-f", str(examples_dir / "homelab.yaml"), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "workstation GPU 0" in r.output
    assert "qwen2.5-14b-instruct" in r.output
    assert "CPU only:" in r.output
    assert "qwen2.5-32b on nas: 21.0 GiB RAM" in r.output


def test_json(examples_dir: Path) -> None:
    r = CliRunner().invoke(app(), ["place", "-f", str(examples_dir / "homelab.yaml"), "--json", "--workers", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["status"] == "OPTIMAL"
    assert doc["unplaced"] == []
    a = next(x for x in doc["assignments"] if x["model"] == "qwen2.5-coder-7b")
    assert a["node"] == "workstation"
    assert a["gpu_layers"] == a["layers"] == 29
    assert a["vram_bytes"] == {"0": 4_400_000_000}
    for g in doc["gpus"]:
        assert g["used_bytes"] <= g["capacity_bytes"]


def test_unplaced_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "version: 1\ncluster: {name: t}\nnodes:\n  - name: n\n    tier: local\n    address: h\n    ram: 8GiB\n"
        "    gpus: [{index: 0, name: g, vram: 4GiB}]\n    ollama: {url: 'http://h:1'}\n"
        "models:\n  - name: big\n    runtime: ollama\n    source: {ollama: big}\n"
        "    memory: {vram: 9GiB}\n    placement: {cpu_offload: false}\n"
    )
    r = CliRunner().invoke(app(), ["place", "-f", str(f), "--workers", "1"])
    assert r.exit_code == 2
    assert "big needs 9.0 GiB at 4k context" in r.output


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(app(), ["place", "-f", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 1
    assert "Traceback" not in r.output


SPLIT_SPEC = """version: 1
cluster: {name: t}
nodes:
  - name: n
    tier: local
    address: h
    ram: 64GiB
    gpus: [{index: 0, name: g, vram: 8GiB}, {index: 1, name: g, vram: 8GiB}]
    docker: {endpoint: "unix:///var/run/docker.sock"}
    llamacpp: {image: llama, ports: 3000-3009}
models:
  - name: big
    runtime: llamacpp
    source: {gguf: /m/big.gguf}
    memory: {vram: 12GiB, layers: 20}
    placement: {cpu_offload: false, split: true}
"""


def test_split_rows_and_json(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(SPLIT_SPEC)
    r = CliRunner().invoke(app(), ["place", "-f", str(f), "--workers", "1", "--json"])
    assert r.exit_code == 0, r.output
    [a] = json.loads(r.output)["assignments"]
    assert a["gpus"] == [0, 1]
    per_gpu = a["layers_per_gpu"]
    assert set(per_gpu) == {"0", "1"} and sum(per_gpu.values()) == a["gpu_layers"] == 21
    assert set(a["vram_bytes"]) == {"0", "1"}
    r = CliRunner().invoke(app(), ["place", "-f", str(f), "--workers", "1"])
    assert r.exit_code == 0, r.output
    for i in ("0", "1"):
        gib = f"{a['vram_bytes'][i] / (1 << 30):.1f}"
        # A row in each GPU's table: its own GiB and its own layers of the 21.
        assert f"n GPU {i}" in r.output
        assert f"{gib} │ {per_gpu[i]}/21 (split 0+1)" in r.output


POOL_SPEC = """version: 1
cluster: {name: t}
nodes:
  - name: a
    tier: remote
    address: h
    ram: 64GiB
    docker: {endpoint: "unix:///var/run/docker.sock"}
    gpus: [{index: 0, name: g, vram: 12GiB}]
    llamacpp: {image: llama, ports: 3000-3009, max_loaded: 2}
models:
  - {name: p1, runtime: llamacpp, source: {gguf: /m/p1.gguf}, memory: {vram: 4GiB, ram: 1GiB},
     placement: {cpu_offload: false}}
  - {name: o1, runtime: llamacpp, source: {gguf: /m/o1.gguf}, memory: {vram: 3GiB, ram: 1GiB},
     residency: on-demand, ttl: 5m}
  - {name: o2, runtime: llamacpp, source: {gguf: /m/o2.gguf}, memory: {vram: 4GiB, ram: 1GiB}, residency: on-demand}
  - {name: o3, runtime: llamacpp, source: {gguf: /m/o3.gguf}, memory: {vram: 2GiB, ram: 1GiB}, residency: on-demand}
  - {name: o4, runtime: llamacpp, source: {gguf: /m/o4.gguf}, memory: {vram: 9GiB, ram: 1GiB}, residency: on-demand}
  - {name: o5, runtime: llamacpp, source: {gguf: /m/o5.gguf}, memory: {vram: 20GiB}, residency: on-demand,
     placement: {cpu_offload: false}}
"""


def test_pools_table_and_json(tmp_path: Path) -> None:
    """Each GPU's pinned models, then its pool (members, size, max_loaded); CPU pools; the one left out explained."""
    f = tmp_path / "c.yaml"
    f.write_text(POOL_SPEC)
    r = CliRunner().invoke(app(), ["place", "-f", str(f), "--workers", "1", "--time-limit", "5"])
    assert r.exit_code == 2, r.output
    lines = [line.strip("│ ") for line in r.output.splitlines()]
    assert any(line.startswith("p1 ") and "4.0" in line for line in lines)
    # 4 + 3 GiB: the two largest of o1, o2, o3 (o4's 9 GiB would make it 13 GiB beside p1's 4 GiB).
    assert any(line.startswith("swap pool (llamacpp, max_loaded 2)") and "7.0" in line for line in lines)
    for name, size in (("o1", "3.0"), ("o2", "4.0"), ("o3", "2.0")):
        assert any(line.startswith(f"{name} (on-demand)") and size in line for line in lines), name
    assert any(line.startswith("total") and "11.0" in line for line in lines)
    assert "CPU swap pools:\n  a (llamacpp, max_loaded 2): 10.0 GiB RAM for o4" in r.output
    assert "o5 (on-demand) needs 20.0 GiB loaded at 4k context, fully on one GPU;" in r.output
    r = CliRunner().invoke(app(), ["place", "-f", str(f), "--workers", "1", "--time-limit", "5", "--json"])
    assert r.exit_code == 2, r.output
    doc = json.loads(r.output)
    gib = 1 << 30
    assert doc["pools"] == [
        {
            "node": "a",
            "gpu": None,
            "runtime": "llamacpp",
            "members": ["o4"],
            "max_loaded": 2,
            "size_bytes": 0,
            "ram_bytes": 10 * gib,
        },
        {
            "node": "a",
            "gpu": 0,
            "runtime": "llamacpp",
            "members": ["o1", "o2", "o3"],
            "max_loaded": 2,
            "size_bytes": 7 * gib,
            "ram_bytes": 2 * gib,
        },
    ]
    assert doc["gpus"] == [
        {"node": "a", "index": 0, "capacity_bytes": 12 * gib, "used_bytes": 11 * gib, "pool_bytes": 7 * gib}
    ]
    o1 = next(x for x in doc["assignments"] if x["model"] == "o1")
    assert o1["on_demand"] is True and o1["gpus"] == [0] and o1["gpu_layers"] == o1["layers"]
    assert [u["model"] for u in doc["unplaced"]] == ["o5"]
