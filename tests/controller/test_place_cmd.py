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
