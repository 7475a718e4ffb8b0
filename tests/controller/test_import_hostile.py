"""Hostile input files for `homelab import` (issue 29): a LiteLLM or llama-swap config is read with the spec
loader's limits (a regular file only, 128 KiB, 25,000 values, 32 levels), and whatever its shape each case ends
in one located `error:` line and exit 1 within 2 s of CPU and 500 MB — never a traceback, a hang or a crash.

The corpus is generated here (as tests/specs/test_hostile.py does for specs): odd files (a FIFO with no writer,
/dev/zero, a directory, a 50 MB file), YAML built to exhaust the reader (alias bombs, deep nesting), llama-swap
macros that double at each step, and values that used to raise inside the importer (a port past 65535, a broken
IPv6 URL, `fallbacks: 5`, a newline in a model ID). Each runs `homelab import` in a forked child
(`tests.support.bounded`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.drivers.fake import FakeDockerNode
from tests.specs.test_hostile import bomb, merge_bomb
from tests.support.bounded import check_bounded, run_bounded
from tests.support.wiring import Wired

SWAP_OK = "models:\n  a: {cmd: 'llama-server -m /srv/a.gguf --port ${PORT}', proxy: 'http://127.0.0.1:9000'}\n"
LITELLM_OK = "model_list:\n  - {model_name: chat, litellm_params: {model: openai/a, api_base: 'http://h:9000/v1'}}\n"


def doubling_macros(levels: int) -> str:
    """llama-swap macros that each use the one before twice: 2**levels characters from a 1 KB file."""
    lines = ["macros:", "  m0: 'xxxxxxxx'"]
    lines += [f"  m{i}: '${{m{i - 1}}}${{m{i - 1}}}'" for i in range(1, levels)]
    lines += ["models:", f"  a: {{cmd: 'llama-server -m /srv/a.gguf ${{m{levels - 1}}}'}}"]
    return "\n".join(lines) + "\n"


def doubling_cmd(levels: int) -> str:
    """The doubling done in one `cmd` (no macro grows past the bound alone): 64 uses of a 4 KiB macro."""
    return f"macros: {{m: '{'y' * 4096}'}}\nmodels:\n  a: {{cmd: 'llama-server -m /srv/a.gguf {'${m}' * levels}'}}\n"


TEXT_CASES: list[tuple[str, str, str, str]] = [
    # (id, which input, its text, what the error line says)
    ("swap-alias-bomb", "llama-swap", bomb(10), r"expands to more than 25000 values"),
    ("swap-merge-bomb", "llama-swap", merge_bomb(12), r"expands to more than 25000 values"),
    ("litellm-alias-bomb", "litellm", bomb(10), r"expands to more than 25000 values"),
    ("swap-deep-nesting", "llama-swap", "models: " + "[" * 3000 + "]" * 3000 + "\n", r"nested deeper than 32"),
    ("litellm-deep-nesting", "litellm", "a: " + "{b: " * 500 + "1" + "}" * 500 + "\n", r"nested deeper than 32"),
    ("swap-macro-doubling", "llama-swap", doubling_macros(60), r"macros\.m\d+: its macros expand to more than 64"),
    ("swap-cmd-doubling", "llama-swap", doubling_cmd(64), r"models\.a\.cmd: its macros expand to more than 64"),
    ("swap-bad-port", "llama-swap", SWAP_OK.replace(":9000", ":99999"), r"models\.a\.proxy: .* is not a valid URL"),
    ("swap-port-word", "llama-swap", SWAP_OK.replace(":9000", ":http"), r"models\.a\.proxy: .* is not a valid URL"),
    ("swap-ipv6-url", "llama-swap", SWAP_OK.replace("127.0.0.1:9000", "[::1:9000"), r"not a valid URL"),
    ("litellm-bad-port", "litellm", LITELLM_OK.replace(":9000", ":99999"), r"model_list\[0\]\.litellm_params"),
    ("litellm-ipv6-url", "litellm", LITELLM_OK.replace("h:9000", "[fe80::1"), r"api_base: .* is not a valid URL"),
    ("litellm-fallbacks-5", "litellm", LITELLM_OK + "router_settings: {fallbacks: 5}\n", r"fallbacks: must be a list"),
    ("litellm-fallbacks-map", "litellm", LITELLM_OK + "litellm_settings: {fallbacks: {a: b}}\n", r"must be a list"),
    ("swap-newline-in-id", "llama-swap", 'models:\n  "a\\nb\\x1b[2J": {proxy: x}\n', r"models\.a\\nb.*needs `cmd`"),
    ("swap-not-a-mapping", "llama-swap", "- 1\n- 2\n", r":1:1: must be a mapping"),
    ("litellm-syntax", "litellm", "model_list: [unclosed\n", r":2:1: YAML syntax error"),
    ("swap-not-utf8", "llama-swap", "\udcff", r"not UTF-8 text"),
]


def _import(wired: Wired, which: str, path: Path, out: Path) -> Callable[[], object]:
    """`homelab import` of one input file next to an empty Docker node; what it printed and its exit code."""

    def call() -> object:
        result = wired.invoke(
            ["import", "--from-docker", "gpu1=unix:///x", f"--{which}", str(path), "-o", str(out), "--force"]
        )
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return json.dumps([result.exit_code, result.stderr])

    return call


def _check(outcome_text: str, path: Path, fragment: str) -> None:
    code, stderr = json.loads(outcome_text)
    assert code == 1, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert re.search(fragment, lines[0]), lines[0]
    assert not re.search(r"[\x00-\x1f\x7f]", lines[0]), f"control character in {lines[0]!r}"


@pytest.fixture
def quiet_node(wired: Wired) -> Wired:
    fake = FakeDockerNode("gpu1", inspected={})
    wired.set(connect=lambda spec: lambda node: fake)
    return wired


@pytest.mark.parametrize(("which", "text", "fragment"), [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_hostile_import_text(quiet_node: Wired, tmp_path: Path, which: str, text: str, fragment: str) -> None:
    path = tmp_path / "input.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    out = tmp_path / "cluster.yaml"
    outcome = run_bounded(_import(quiet_node, which, path, out), (), wall_limit=20)
    check_bounded(outcome)
    _check(outcome.text, path, fragment)
    assert not out.exists()


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return path


def _big(tmp_path: Path) -> Path:
    path = tmp_path / "big.yaml"
    with path.open("w") as f:
        f.write("models:\n" + "  # padding padding padding padding padding padding padding padding\n" * 800_000)
    return path


FILE_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("fifo-no-writer", _fifo, r"is a FIFO, not a config file"),
    ("dev-zero", lambda _: Path("/dev/zero"), r"is a device, not a config file"),
    ("50-MB", _big, r"is larger than 128 KiB"),
    ("missing", lambda p: p / "missing.yaml", r"no such file"),
]


@pytest.mark.parametrize("which", ["llama-swap", "litellm"])
@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_hostile_import_file(
    quiet_node: Wired, tmp_path: Path, which: str, make: Callable[[Path], Path], fragment: str
) -> None:
    path = make(tmp_path)
    out = tmp_path / "cluster.yaml"
    outcome = run_bounded(_import(quiet_node, which, path, out), (), wall_limit=10)
    check_bounded(outcome)
    _check(outcome.text, path, fragment)
    assert not out.exists()
