"""examples/lab/lab.py's spec rendering, without starting anything."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from specs import parse_spec

LAB = Path(__file__).resolve().parents[2] / "examples" / "lab" / "lab.py"


@pytest.fixture(scope="module")
def lab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("homelab_lab", LAB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["homelab_lab"] = module
    spec.loader.exec_module(module)
    return module


def test_the_rendered_spec_uses_the_lab_directory_ports_and_this_checkout(lab: ModuleType, tmp_path: Path) -> None:
    ports = {
        "ssh": {"local": 40001, "remote": 40002, "nas": 40003},
        "ollama": {"local": 40011, "nas": 40013},
        "llamacpp": {"remote": (40100, 40119)},
        "gateway": 40200,
    }
    text = lab.render_spec(tmp_path, ports, "/opt/litellm/bin/litellm")
    assert lab.TEMPLATE_DIR not in text
    spec = parse_spec(text, "cluster.yaml").spec
    nodes = {n.name: n for n in spec.nodes}
    assert [nodes[n].ssh.port for n in ("local", "remote", "nas")] == [40001, 40002, 40003]  # type: ignore[union-attr]
    assert nodes["local"].ollama is not None and nodes["local"].ollama.url == "http://127.0.0.2:40011"
    assert nodes["nas"].ollama is not None and nodes["nas"].ollama.url == "http://127.0.0.4:40013"
    assert nodes["remote"].llamacpp is not None and (
        nodes["remote"].llamacpp.ports.start,
        nodes["remote"].llamacpp.ports.end,
    ) == (40100, 40119)
    assert nodes["remote"].docker is not None and nodes["remote"].docker.endpoint == (
        f"unix://{tmp_path}/remote/docker/docker.sock"
    )
    wake = nodes["remote"].wake
    assert wake is not None and wake.command == f"{sys.executable} {LAB} --dir {tmp_path} wake remote"
    assert spec.gateway is not None and spec.gateway.port == 40200
    assert spec.gateway.command == ["/opt/litellm/bin/litellm"]
    assert spec.secrets["litellm"] == f"file:{tmp_path}/secrets/litellm-key"
    # comments survive: the rendered file is still the documented example
    assert "# Remote tier:" in text


def test_commands_without_a_lab_say_so_in_one_line(
    lab: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lab.main(["--dir", str(tmp_path / "none"), "down"]) == 0
    assert "no lab in" in capsys.readouterr().out
    assert lab.main(["--dir", str(tmp_path), "wake", "remote"]) == 1
    assert capsys.readouterr().err.strip() == f"lab: error: no lab is up in {tmp_path}"
    assert lab.main(["--dir", str(tmp_path), "wake", "moon"]) == 1
    assert "unknown node 'moon'" in capsys.readouterr().err
    (tmp_path / "keep.txt").write_text("mine")
    assert lab.main(["--dir", str(tmp_path), "down"]) == 1  # not a lab directory: never removed
    assert "is not a lab directory" in capsys.readouterr().err and (tmp_path / "keep.txt").exists()
