"""Issue 23, the command-line side: untrusted text is printed as text, file mistakes are one line.

Each case failed before its fix: rich markup and `:emoji:` codes in a GGUF's name, a path or a spec value
were interpreted (a crash on `[/red]`, `file💯1:` for line 100), escape sequences went to the terminal, and
`--out` into a missing directory or a state directory that is a file gave a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from controller.drivers.fake import FakeDockerNode
from specs.model import ClusterSpec
from tests.controller.test_reconcile import SOURCES, SPEC
from tests.support.wiring import Wired

REPO = Path(__file__).resolve().parents[2]


def homelab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real console entry point (`controller.cli.main`), as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "controller", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd), "COLUMNS": "200"},
    )  # fmt: skip


def tiny_gguf(path: Path, name: str) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(16)
    for t in ("token_embd.weight", "output.weight"):
        w.add_tensor(t, np.zeros((16, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    for t, shape in (("attn_q", (8, 8)), ("attn_k", (8, 8)), ("attn_v", (8, 8)), ("attn_output", (8, 8)),
                     ("ffn_gate", (16, 8)), ("ffn_up", (16, 8)), ("ffn_down", (8, 16))):  # fmt: skip
        w.add_tensor(f"blk.0.{t}.weight", np.zeros(shape, dtype=np.float32))
    for t in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{t}.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_markup_and_escapes_in_a_gguf_name_are_printed_as_text(tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "m.gguf", "evil [/red] [bold]x :100: \x1b]0;pwned\x07\x1b[2J")
    done = homelab("estimate", str(model), "--ngl", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "[/red] [bold]x :100:" in done.stdout and "\\x1b]0;pwned\\x07" in done.stdout


def test_an_error_on_line_100_is_not_an_emoji(tmp_path: Path) -> None:
    lines = ["cluster: {name: c}", "nodes:", "  - {name: n, tier: cpu, address: 127.0.0.1, ram: 1GiB}"]
    lines += [f"# {i}" for i in range(len(lines) + 1, 100)]
    lines.append("bogus: 1")  # line 100
    (tmp_path / "cluster.yaml").write_text("\n".join(lines) + "\n")
    done = homelab("validate", cwd=tmp_path)
    assert done.returncode == 1
    assert "cluster.yaml:100:1:" in done.stderr and "💯" not in done.stderr


def test_emoji_codes_in_a_value_stay_as_written(tmp_path: Path) -> None:
    spec = "cluster: {name: c}\nnodes:\n  - {name: n, tier: cpu, address: 127.0.0.1, ram: 1GiB,"
    spec += " ollama: {url: 'http://127.0.0.1:9'}}\n"
    spec += "secrets: {team: 'env:TEAM_100'}\n"
    spec += "models:\n  - name: m\n    runtime: ollama\n    source: {ollama: 'team:100:chat'}\n"
    (tmp_path / "cluster.yaml").write_text(spec)
    done = homelab("validate", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["models"][0]["source"]["ollama"] == "team:100:chat"


@pytest.mark.parametrize("name", ["[/x]", "[bold]b"])
def test_markup_in_a_path_neither_crashes_nor_vanishes(tmp_path: Path, name: str) -> None:
    target = tmp_path / name / "schema.json"  # a missing directory: the error names the path as written
    done = homelab("schema", "-o", str(target), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert name in done.stderr and done.stderr.count("\n") == 1


@pytest.fixture
def cli(wired: Wired, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Wired:
    fakes = {n: FakeDockerNode(n, images={"llama:test"}, source_files=dict(SOURCES)) for n in ("box", "spare")}

    def factory(spec: ClusterSpec) -> object:
        return lambda node: fakes.setdefault(node.name, FakeDockerNode(node.name, reachable=False))

    wired.set(connect=factory, gpu_probe=lambda nodes: {}, health_check=lambda url, timeout, cancelled, serves: None)
    (tmp_path / "cluster.yaml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    return wired


def test_out_into_a_missing_directory_is_one_line(cli: Wired, tmp_path: Path) -> None:
    code, _, err = cli.run("reconcile", "--dry-run", "--out", str(tmp_path / "nowhere" / "plan.json"))
    assert code == 1
    assert err.strip().startswith("error: --out ") and "No such file or directory" in err


def test_a_state_directory_that_is_a_file_is_one_line(cli: Wired, tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    code, _, err = cli.run("reconcile", "--yes", "--state-dir", str(tmp_path / "state"))
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"error: state directory {tmp_path / 'state'}:")


@pytest.mark.parametrize(("args", "option"), [(["ui", "--port", "99999"], "--port"),
                                              (["ui", "--port", "-1"], "--port"),
                                              (["watch", "--metrics-port", "99999"], "--metrics-port"),
                                              (["watch", "--metrics-port", "-1"], "--metrics-port")])  # fmt: skip
def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path, args: list[str], option: str) -> None:
    """Issue 29: `ui --port 99999` and `watch --metrics-port 99999` gave a traceback (OverflowError in bind).
    A usage error exits 1 here, as every usage error of `homelab` does (`controller.cli.main`)."""
    done = homelab(*args, cwd=tmp_path)
    assert done.returncode == 1, (done.returncode, done.stderr)
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: Invalid value for '{option}'"), line
