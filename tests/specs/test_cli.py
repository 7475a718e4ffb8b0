"""`homelab validate`: which file it reads, what it prints, its exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_validate_examples(examples_dir: Path) -> None:
    code, out, err = invoke("validate", str(examples_dir / "homelab.yaml"))
    assert (code, err) == (0, "")
    assert "valid — cluster 'lumina': 3 nodes, 2 GPUs (48.0 GiB), 12 models, gateway on port 4000" in out
    code, out, _ = invoke("validate", "-f", str(examples_dir / "minimal.yaml"))
    assert code == 0 and "1 node, 1 GPU (24.0 GiB), 1 model" in out
    code, out, _ = invoke("validate", str(examples_dir / "lab" / "cluster.yaml"))
    assert code == 0 and "valid — cluster 'lab': 3 nodes, 3 GPUs (2.8 GiB), 7 models, gateway on port 4000" in out


def test_validate_reads_homelab_spec_env_then_cwd(
    examples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke("validate", env={"HOMELAB_SPEC": ""})
    assert code == 1 and err.startswith("cluster.yaml: no such file")
    code, out, _ = invoke("validate", env={"HOMELAB_SPEC": str(examples_dir / "minimal.yaml")})
    assert code == 0 and "minimal" in out
    (tmp_path / "cluster.yaml").write_text((examples_dir / "minimal.yaml").read_text())
    code, out, _ = invoke("validate", env={"HOMELAB_SPEC": ""})
    assert code == 0 and out.startswith("cluster.yaml: valid")


def test_two_different_files_is_an_error(examples_dir: Path) -> None:
    code, _, err = invoke("validate", str(examples_dir / "homelab.yaml"), "-f", str(examples_dir / "minimal.yaml"))
    assert code == 1
    assert err.startswith("error: two spec files given")


def test_validate_json(examples_dir: Path) -> None:
    code, out, _ = invoke("validate", "--json", str(examples_dir / "homelab.yaml"))
    assert code == 0
    data = json.loads(out)
    gpu = data["nodes"][0]["gpus"][0]
    assert gpu["vram"] == 24 * 1024**3 and gpu["reserve"] == int(1.5 * 1024**3)
    assert data["health"]["timeouts"] == {"workstation": 8.0}
    assert data["gateway"]["master_key"] == "secret:litellm-master"


def test_warnings_do_not_fail_validation(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        """\
cluster: {name: lab}
nodes:
  - {name: a, tier: local, address: 127.0.0.1, ram: 8GiB, ollama: {url: "http://127.0.0.1:11434"}}
models:
  - {name: m, runtime: ollama, source: {ollama: "m:1"}, categories: [chat]}
routing:
  categories:
    code: {models: [m]}
"""
    )
    code, _out, err = invoke("validate", str(spec))
    assert code == 0
    assert err == (
        f"{spec}:8:21: warning: routing.categories.code.models[0]: model 'm' does not list 'code' in its categories\n"
    )


def test_directory_and_unreadable_inputs(tmp_path: Path) -> None:
    code, _, err = invoke("validate", "-f", str(tmp_path))
    assert code in (1, 2) and "Traceback" not in err
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"cluster:\n  name: caf\xe9\n")
    code, _, err = invoke("validate", str(bad))
    assert code == 1 and err.startswith(f"{bad}:2:1: not UTF-8 text")
