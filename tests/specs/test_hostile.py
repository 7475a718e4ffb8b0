"""Hostile and careless spec input (issue 23): every case ends in one located error line, or loads
correctly, within 2 s of CPU and 500 MB, and never in a traceback, a hang or an echoed secret.

The corpus is generated here: odd files (a FIFO with no writer, /dev/zero, a directory, a 50 MB
spec), YAML built to exhaust the loader (alias bombs, recursive aliases, deep nesting, complex keys,
numbers of hundreds of digits), values that used to validate and crash later (NaN durations, huge
sizes and layer counts, clashing GGUF names, a GGUF on one node placed on another, flags homelab
owns in `args`), numeric secrets, and text with markup, escapes and emoji codes. Each case runs in
a forked child (`tests.support.bounded`) that measures its CPU time and memory. Hypothesis then
fuzzes the loader with random edits of a valid spec.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from controller.cli import app
from controller.core.desired import render
from solver.place import SolveParams, place
from solver.profiles import profiles_for
from specs import SpecError, load_spec, parse_spec
from specs.load import MAX_SPEC_BYTES, MAX_YAML_DEPTH
from tests.support.bounded import check_bounded, run_bounded

BASE = """\
cluster:
  name: lab
nodes:
  - name: big
    tier: remote
    address: 10.0.0.2
    docker: {endpoint: "unix:///var/run/docker.sock"}
    gpus:
      - {index: 0, name: RTX 3090, vram: 24GiB}
    ram: 64GiB
    llamacpp: {image: "llama:local", ports: 3000-3009}
    ssh: {user: admin, sudo_password: "secret:sudo"}
  - name: small
    tier: remote
    address: small.lan
    docker: {endpoint: "unix:///var/run/docker.sock"}
    gpus:
      - {index: 0, name: RTX 3060, vram: 4GiB}
    ram: 32GiB
    llamacpp: {image: "llama:local", ports: 3000-3009}
    wake: {command: "ipmitool power on", stdin: "secret:ipmi"}
models:
  - name: coder
    runtime: llamacpp
    source: {gguf: /srv/a/coder.gguf}
    memory: {vram: 6GiB, layers: 32}
    categories: [code]
gateway:
  mode: external
  master_key: "secret:master"
health:
  timeout: 5s
secrets:
  master: "env:LITELLM_KEY"
  sudo: "env:SUDO_PASSWORD"
  ipmi: "env:IPMI_PASSWORD"
"""
SECRET = "987654321"


def edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, f"{old!r} is not once in BASE"
    return BASE.replace(old, new)


def add_model(text: str) -> str:
    return BASE.replace("gateway:\n", text + "gateway:\n")


def bomb(levels: int, width: int = 9) -> str:
    """The "billion laughs": each level a list of `width` aliases of the one before."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int) -> str:
    lines = ["m0: &m0 {k: [lol, lol, lol, lol, lol, lol, lol, lol]}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{a: *m{i - 1}, b: *m{i - 1}, c: *m{i - 1}, d: *m{i - 1}}}")
    return "\n".join(lines) + "\n"


# (id, spec text, regex the single error line must match after "FILE:LINE:COL: ", or None: loads)
TEXT_CASES: list[tuple[str, str, str | None]] = [
    ("base", BASE, None),
    ("alias-bomb-272-bytes", bomb(9), r"expands to more than 25000 values"),
    ("alias-bomb-307-bytes", bomb(10), r"expands to more than 25000 values"),
    ("alias-bomb-wide", bomb(5, width=60), r"expands to more than 25000 values"),
    ("alias-bomb-merge", merge_bomb(12), r"expands to more than 25000 values"),
    (
        "alias-bomb-in-spec",
        BASE + "x:\n" + "".join(f"  {line}\n" for line in bomb(9).splitlines()),
        r"expands to more than 25000 values",
    ),
    ("recursive-alias-list", "a: &a [1, *a]\n", r"alias \*a is used inside the node it names"),
    ("recursive-alias-map", "a: &a {b: *a}\n", r"alias \*a is used inside the node it names"),
    ("undefined-alias", "a: *nothing\n", r"YAML syntax error: found undefined alias"),
    ("deep-flow-250", "a: " + "[" * 250 + "]" * 250 + "\n", r"nested deeper than 32 levels"),
    ("deep-flow-unclosed", "a: " + "[" * 5000 + "\n", r"nested deeper than|YAML syntax error"),
    ("deep-block-250", "".join(" " * i + "-\n" for i in range(250)), r"nested deeper than 32 levels"),
    ("deep-map-250", "".join(" " * i + "k:\n" for i in range(250)), r"nested deeper than 32 levels"),
    ("deep-in-models", edit("categories: [code]", "categories: " + "[" * 300 + "]" * 300), r"nested deeper"),
    ("complex-key-list", "? [a, b]\n: 1\n", r"a mapping key must be a plain value"),
    ("complex-key-map", "cluster:\n  ? {a: 1}\n  : x\n", r"a mapping key must be a plain value"),
    ("complex-key-in-spec", edit("  name: lab\n", "  name: lab\n  ? [a, b]\n  : 1\n"), r"mapping key must be"),
    ("int-5000-digits", edit("layers: 32", "layers: " + "9" * 5000), r"YAML error: .*4300 digits"),
    (
        "int-400-digits-context",
        edit("categories: [code]", "context: " + "9" * 400),
        r"models\[0\]\.context: must be at most 16777216 \(got a 400-digit number\)",
    ),
    ("int-400-digits-vram", edit("vram: 24GiB", "vram: " + "9" * 400), r"vram: must be at most 1 PiB"),
    ("size-400-digits", edit("vram: 24GiB", "vram: " + "9" * 400 + "GiB"), r"vram: must be at most 1 PiB"),
    ("size-1e400", edit("vram: 24GiB", "vram: 1e400"), r"vram: must be a finite size"),
    ("size-inf", edit("vram: 24GiB", "vram: .inf"), r"vram: must be a finite size"),
    ("size-nan", edit("vram: 24GiB", "vram: .nan"), r"vram: must be a finite size"),
    ("gpu-vram-1e30", edit("vram: 24GiB", "vram: " + str(10**30)), r"vram: must be at most 1 PiB"),
    ("memory-vram-huge", edit("memory: {vram: 6GiB", "memory: {vram: 1000000PiB"), r"unknown size unit|1 PiB"),
    ("memory-vram-1e30", edit("memory: {vram: 6GiB", "memory: {vram: " + str(10**30)), r"vram: must be at most"),
    ("memory-layers-huge", edit("layers: 32", "layers: 4294967295"), r"layers: must be at most 512"),
    ("memory-layers-1e9", edit("layers: 32", "layers: 1000000000"), r"layers: must be at most 512"),
    (
        "min-gpu-layers-huge",
        edit("layers: 32}", "layers: 32}\n    placement: {min_gpu_layers: 99999999}"),
        r"min_gpu_layers: must be at most 513",
    ),
    ("replicas-huge", edit("layers: 32}", "layers: 32}\n    replicas: 10000000000"), r"replicas: must be at most"),
    ("ram-1e30", edit("ram: 64GiB", "ram: " + str(10**30)), r"ram: must be at most 1 PiB"),
    ("health-timeout-nan", edit("timeout: 5s", "timeout: nan"), r"health\.timeout: is not a duration"),
    ("health-timeout-dot-nan", edit("timeout: 5s", "timeout: .nan"), r"health\.timeout: must be a finite"),
    ("health-timeout-inf", edit("timeout: 5s", "timeout: inf"), r"health\.timeout: is not a duration"),
    ("health-timeout-dot-inf", edit("timeout: 5s", "timeout: .inf"), r"health\.timeout: must be a finite"),
    ("health-timeout-1e400", edit("timeout: 5s", "timeout: 1e400"), r"health\.timeout: must be a finite"),
    ("health-timeout-1e300", edit("timeout: 5s", "timeout: 1e300"), r"health\.timeout: must be at most a year"),
    ("health-timeout-10e30", edit("timeout: 5s", "timeout: " + str(10**30)), r"must be at most a year"),
    ("health-timeout-long-text", edit("timeout: 5s", "timeout: " + "9" * 400 + "s"), r"is not a duration"),
    (
        "classifier-weight-inf",
        BASE + "routing:\n  rules:\n    code: {keywords: [x], weight: .inf}\n",
        r"weight: must be a finite number",
    ),
    ("backoff-factor-nan", BASE + "recovery:\n  backoff: {factor: .nan}\n", r"factor: must be a finite number"),
    (
        "master-key-number",
        edit('master_key: "secret:master"', f"master_key: {SECRET}"),
        r"gateway\.master_key: must be a string \(got a number\)",
    ),
    (
        "master-key-float",
        edit('master_key: "secret:master"', f"master_key: {SECRET}.5"),
        r"gateway\.master_key: must be a string \(got a number\)",
    ),
    (
        "master-key-literal",
        edit('master_key: "secret:master"', f"master_key: hunter{SECRET}"),
        r"gateway\.master_key: must be a secret reference",
    ),
    (
        "sudo-password-number",
        edit('sudo_password: "secret:sudo"', f"sudo_password: {SECRET}"),
        r"sudo_password: must be a string \(got a number\)",
    ),
    (
        "secrets-entry-number",
        edit('ipmi: "env:IPMI_PASSWORD"', f"ipmi: {SECRET}"),
        r"secrets\.ipmi: must be a string \(got a number\)",
    ),
    (
        "wake-stdin-number",
        edit('stdin: "secret:ipmi"', f"stdin: {SECRET}"),
        r"stdin: must be a string \(got a number\)",
    ),
    (
        "secret-with-escape",
        edit('ipmi: "env:IPMI_PASSWORD"', f'ipmi: "env:X\\e]0;{SECRET}\\a"'),
        r"secrets: must not contain control characters",
    ),
    (
        "gguf-nul-byte",
        edit("gguf: /srv/a/coder.gguf", 'gguf: "/srv/a/co\\0der.gguf"'),
        r"gguf: must not contain control",
    ),
    ("gguf-relative", edit("gguf: /srv/a/coder.gguf", "gguf: models/coder.gguf"), r"gguf: must be an absolute path"),
    ("gguf-root", edit("gguf: /srv/a/coder.gguf", "gguf: /"), r"gguf: must be the path of a file"),
    ("gguf-directory", edit("gguf: /srv/a/coder.gguf", "gguf: /srv/a/"), r"gguf: must be the path of a file"),
    ("gguf-dotdot", edit("gguf: /srv/a/coder.gguf", "gguf: /srv/a/.."), r"gguf: must be the path of a file"),
    ("gguf-windows-ok", edit("gguf: /srv/a/coder.gguf", "gguf: D:/models/coder.gguf"), None),
    (
        "newline-in-gpu-name",
        edit("name: RTX 3090", 'name: "RTX 3090\\n+ create container evil"'),
        r"nodes\[0\]\.gpus\[0\]\.name: must not contain control characters",
    ),
    (
        "escape-in-image",
        edit('image: "llama:local", ports: 3000-3009}\n    ssh', 'image: "llama\\e[2J", ports: 3000-3009}\n    ssh'),
        r"nodes\[0\]\.llamacpp\.image: must not contain control characters",
    ),
    (
        "newline-in-args",
        edit("categories: [code]", 'categories: [code]\n    args: ["--verbose\\n+ remove x"]'),
        r"models\[0\]\.args\[0\]: must not contain control characters",
    ),
    (
        "bidi-in-alias",
        edit("categories: [code]", 'categories: [code]\n    alias: "co\\u202eder"'),
        r"models\[0\]\.alias: must not contain control characters",
    ),
    ("c1-in-user", edit("user: admin", 'user: "adm\\x9bin"'), r"ssh\.user: must not contain control characters"),
    (
        "multiline-wake-command-ok",
        edit(
            '    wake: {command: "ipmitool power on", stdin: "secret:ipmi"}\n',
            '    wake:\n      command: |\n        ipmitool \\\n          power on\n      stdin: "secret:ipmi"\n',
        ),
        None,
    ),
    (
        "escape-in-wake-command",
        edit('command: "ipmitool power on"', 'command: "ipmitool\\e]0;x\\a"'),
        r"wake\.command: must not contain control characters other than newline and tab",
    ),
    (
        "address-url-pieces",
        edit("address: 10.0.0.2", 'address: "127.0.0.1:9/x#"'),
        r"nodes\[0\]\.address: must be a host name, an IPv4 address or an IPv6 address",
    ),
    ("address-bracketed", edit("address: 10.0.0.2", 'address: "[::1]"'), r"address: must be a host name"),
    ("address-url", edit("address: 10.0.0.2", "address: http://evil/"), r"address: must be a host name"),
    ("address-space", edit("address: 10.0.0.2", 'address: "a b"'), r"address: must be a host name"),
    ("address-ipv6-ok", edit("address: 10.0.0.2", 'address: "fd00::2"'), None),
    (
        "gateway-host-url",
        edit("  mode: external\n", "  mode: external\n  host: 0.0.0.0:1/x\n"),
        r"gateway\.host: must be",
    ),
    (
        "args-ngl",
        edit("categories: [code]", 'categories: [code]\n    args: ["-ngl", "99"]'),
        r"models\[0\]\.args\[0\]: '-ngl' is set by homelab from the spec's placement",
    ),
    (
        "args-port-equals",
        edit("categories: [code]", 'categories: [code]\n    args: ["--port=1"]'),
        r"models\[0\]\.args\[0\]: '--port' is set by homelab",
    ),
    (
        "args-ctx",
        edit("categories: [code]", 'categories: [code]\n    args: ["--ctx-size", "9"]'),
        r"'--ctx-size' is set",
    ),
    (
        "args-cache",
        edit("categories: [code]", 'categories: [code]\n    args: ["-ctk", "q8_0"]'),
        r"from the spec's kv_cache",
    ),
    ("args-alias", edit("categories: [code]", 'categories: [code]\n    args: ["--alias", "x"]'), r"'--alias' is set"),
    ("args-model", edit("categories: [code]", 'categories: [code]\n    args: ["-m", "/x.gguf"]'), r"'-m' is set"),
    ("args-other-ok", edit("categories: [code]", 'categories: [code]\n    args: ["--jinja", "--temp", "0.7"]'), None),
    (
        "server-args-split",
        edit("ports: 3000-3009}\n    wake", "ports: 3000-3009, server_args: [--tensor-split, '1,1']}\n    wake"),
        r"nodes\[1\]\.llamacpp\.server_args\[0\]: '--tensor-split' is set",
    ),
    (
        "same-gguf-name",
        add_model(
            "  - name: other\n    runtime: llamacpp\n    source: {gguf: /srv/other/coder.gguf}\n"
            "    memory: {vram: 1GiB}\n"
        ),
        r"models\[1\]\.source\.gguf: has the file name 'coder\.gguf' of models\[0\] \('coder'\)",
    ),
    (
        "same-gguf-name-windows",
        add_model(
            "  - name: other\n    runtime: llamacpp\n    source: {gguf: 'D:\\models\\coder.gguf'}\n"
            "    memory: {vram: 1GiB}\n"
        ),
        r"has the file name 'coder\.gguf'",
    ),
    (
        "same-gguf-name-other-nodes-ok",
        add_model(
            "  - name: other\n    runtime: llamacpp\n    source: {gguf: /srv/other/coder.gguf}\n"
            "    memory: {vram: 1GiB}\n    placement: {node: small}\n"
        ).replace("categories: [code]", "categories: [code]\n    placement: {node: big}"),
        None,
    ),
    (
        "same-gguf-same-path-ok",
        add_model(
            "  - name: other\n    runtime: llamacpp\n    source: {gguf: /srv/a/coder.gguf}\n    memory: {vram: 1GiB}\n"
        ),
        None,
    ),
    (
        "source-node-pinned-elsewhere",
        edit(
            "source: {gguf: /srv/a/coder.gguf}",
            "source: {gguf: /srv/a/coder.gguf, node: small}\n    placement: {node: big}",
        ),
        r"models\[0\]\.placement\.node: the model's file is on node 'small' \(source\.node\): it can only run there",
    ),
    (
        "source-node-replicas",
        edit("source: {gguf: /srv/a/coder.gguf}", "source: {gguf: /srv/a/coder.gguf, node: small}\n    replicas: 2"),
        r"models\[0\]\.replicas: 2 replicas need 2 nodes, but the file is on node 'small' only",
    ),
    (
        "source-node-ok",
        edit("source: {gguf: /srv/a/coder.gguf}", "source: {gguf: /srv/a/coder.gguf, node: small}"),
        None,
    ),
    ("markup-in-gpu-name-ok", edit("name: RTX 3090", 'name: "RTX [/red] [bold]3090[/bold] :100:"'), None),
    (
        "emoji-code-in-category-rule-ok",
        BASE + "routing:\n  rules:\n    code: {keywords: ['team:100:chat', '[/x]']}\n",
        None,
    ),
    ("emoji-in-gpu-name-ok", edit("name: RTX 3090", 'name: "RTX 3090 🚀"'), None),
    ("python-tag", BASE + 'x: !!python/object/apply:os.system ["touch /tmp/hostile-pwned"]\n', r"YAML|unknown key"),
    ("binary-tag-ok", edit("name: RTX 3090", "name: !!binary aGVsbG8="), None),
    (
        "binary-tag-escape",
        edit("name: RTX 3090", "name: !!binary G1sySg=="),
        r"gpus\[0\]\.name: must not contain control",
    ),
    ("set-tag-ok", edit("categories: [code]", "categories: !!set {code}"), None),
    ("timestamp", edit("name: RTX 3090", "name: 2001-12-14t21:59:43.10-05:00"), r"name: must be a string"),
    ("duplicate-anchor", edit("timeout: 5s", "timeout: &x 5s\n  interval: &x 7s\n  slow_threshold: *x"), None),
    ("long-scalar", edit("name: RTX 3090", "name: " + "x" * 100_000), None),
    ("too-big-text", BASE + "#" * MAX_SPEC_BYTES, r"is larger than 128 KiB"),
    ("flow-list-60k", "a: [" + "1," * 60_000 + "1]\n", r"expands to more than 25000 values"),
    ("non-mapping", "[1, 2, 3]\n", r"the document must be a mapping"),
    ("only-comment", "# nothing\n", r"the file is empty"),
]
assert len({c[0] for c in TEXT_CASES}) == len(TEXT_CASES)

LOCATED = re.compile(r"^(?P<file>[^\n]*?)(?::(?P<line>\d+):(?P<col>\d+))?: (?P<rest>[^\n]+)$")


def _load(path: Path) -> Callable[[], object]:
    def call() -> object:
        loaded = load_spec(path)
        return json.dumps([m.model_dump(mode="json") for m in loaded.spec.nodes], ensure_ascii=False)

    return call


def _check_one_line(text: str, file: str, fragment: str) -> None:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {lines}"
    match = LOCATED.match(lines[0])
    assert match is not None and match["file"] == file, lines[0]
    assert re.search(fragment, match["rest"]), lines[0]
    assert not re.search(r"[\x00-\x1f\x7f]", lines[0]), f"control character in {lines[0]!r}"
    assert SECRET not in lines[0]


@pytest.mark.parametrize(("text", "fragment"), [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_hostile_spec_text(tmp_path: Path, text: str, fragment: str | None) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    outcome = run_bounded(_load(path), (SpecError,))
    check_bounded(outcome)
    if fragment is None:
        assert outcome.kind == "ok", outcome.text
    else:
        assert outcome.kind == "error", outcome.text[:300]
        _check_one_line(outcome.text, str(path), fragment)
    assert not Path("/tmp/hostile-pwned").exists()


def test_markup_survives_as_text(tmp_path: Path) -> None:
    """A value with rich markup or an emoji code is loaded exactly as written (printing it is the CLI's job)."""
    loaded = parse_spec(edit("name: RTX 3090", 'name: "RTX [/red] :100: team:100:chat"'))
    assert loaded.spec.nodes[0].gpus[0].name == "RTX [/red] :100: team:100:chat"


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return path


def _big(tmp_path: Path) -> Path:
    """A 50 MB spec of 560k models, as in the issue."""
    path = tmp_path / "big.yaml"
    model = "  - {name: m, runtime: llamacpp, source: {gguf: /m.gguf}, memory: {vram: 1GiB}}\n"
    count = 50_000_000 // len(model)
    with path.open("w") as f:
        f.write(BASE.replace("models:\n", "models:\n" + model * count))
    assert path.stat().st_size > 50_000_000
    return path


def _symlink_zero(tmp_path: Path) -> Path:
    path = tmp_path / "zero.yaml"
    path.symlink_to("/dev/zero")
    return path


def _directory(tmp_path: Path) -> Path:
    path = tmp_path / "dir.yaml"
    path.mkdir()
    return path


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    return path


def _nul_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "nul.yaml"
    path.write_bytes(BASE.encode() + b"\x00\x00\x00")
    return path


def _unreadable(tmp_path: Path) -> Path:
    path = tmp_path / "secret.yaml"
    path.write_text(BASE)
    path.chmod(0)
    return path


FILE_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("fifo-no-writer", _fifo, r"is a FIFO, not a spec file"),
    ("dev-zero", lambda _: Path("/dev/zero"), r"is a device, not a spec file"),
    ("symlink-to-dev-zero", _symlink_zero, r"is a device, not a spec file"),
    ("directory", _directory, r"is a directory, not a spec file"),
    ("50-MB-spec", _big, r"is larger than 128 KiB \(\d+ bytes\)"),
    ("not-utf8", _not_utf8, r"not UTF-8 text"),
    ("nul-bytes", _nul_bytes, r"YAML error: unacceptable character #x0000"),
    ("missing", lambda p: p / "missing.yaml", r"no such file"),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_hostile_spec_file(tmp_path: Path, make: Callable[[Path], Path], fragment: str) -> None:
    path = make(tmp_path)
    outcome = run_bounded(_load(path), (SpecError,))
    check_bounded(outcome)
    assert outcome.kind == "error", outcome.text[:300]
    _check_one_line(outcome.text, str(path), fragment)


def test_unreadable_file(tmp_path: Path) -> None:
    path = _unreadable(tmp_path)
    if os.access(path, os.R_OK):  # root reads anything: then the file simply loads
        assert load_spec(path).spec.cluster.name == "lab"
        return
    with pytest.raises(SpecError) as info:
        load_spec(path)
    _check_one_line(str(info.value), str(path), r"cannot read: Permission denied")


def test_nul_byte_in_the_spec_path() -> None:
    with pytest.raises(SpecError) as info:
        load_spec("spec\0.yaml")
    assert str(info.value) == "spec\0.yaml: not a valid file name"


def test_fifo_is_refused_without_opening(tmp_path: Path) -> None:
    """The stat comes first: a FIFO is never opened (an open would block until a writer comes)."""
    path = _fifo(tmp_path)
    with pytest.raises(SpecError, match="is a FIFO"):
        load_spec(path)
    assert stat.S_ISFIFO(path.stat().st_mode)


# --------------------------------------------------------------------------- valid, then crashing later


def test_validate_json_never_prints_nan(tmp_path: Path) -> None:
    for value in ("nan", ".nan", ".inf", "-.inf", "1e400"):
        path = tmp_path / "spec.yaml"
        path.write_text(edit("timeout: 5s", f"timeout: {value}"))
        result = CliRunner().invoke(app, ["validate", "--json", str(path)])
        assert result.exit_code == 1, result.output
        assert "NaN" not in result.output and "Infinity" not in result.output
        assert "health.timeout" in result.output


def _placed(text: str) -> dict[str, str]:
    spec = parse_spec(text).spec
    result = place(spec, profiles_for(spec), params=SolveParams(time_limit=5.0))
    state = render(spec, result)  # raised RenderError before source.node restricted the placement
    return {c.model: node for node, ns in state.nodes.items() for c in ns.containers}


def test_source_node_restricts_placement() -> None:
    """A GGUF on `small` (4 GiB GPU) is served there, partly offloaded, though `big` would hold it whole."""
    text = edit("source: {gguf: /srv/a/coder.gguf}", "source: {gguf: /srv/a/coder.gguf, node: small}")
    assert _placed(text) == {"coder": "small"}
    assert _placed(BASE) == {"coder": "big"}


def test_two_models_same_file_name_never_reach_render() -> None:
    text = add_model(
        "  - name: other\n    runtime: llamacpp\n    source: {gguf: /srv/other/coder.gguf}\n    memory: {vram: 1GiB}\n"
    )
    with pytest.raises(SpecError, match=r"spec\.yaml:\d+:\d+: models\[1\]\.source\.gguf: has the file name"):
        parse_spec(text, "spec.yaml")


# --------------------------------------------------------------------------- fuzzing

_PIECES = [
    "&a ",
    "*a",
    "<<: *a",
    "? ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    ": ",
    "- ",
    "\n",
    "  ",
    "!!binary ",
    "!!set ",
    "!!python/object:os.system ",
    ".nan",
    ".inf",
    "-.inf",
    "1e400",
    "9" * 40,
    "0x1F",
    "0o17",
    "~",
    "null",
    "'",
    '"',
    "\\x1b[2J",
    "\\0",
    "#",
    "---",
    "...",
    "%YAML 1.1\n",
    "|",
    ">",
    "\t",
    "\u202e",
    "[/red]",
    ":100:",
    "secret:",
    "env:",
    "cmd:",
    "/",
    "..",
    "C:\\",
    "-ngl",
    "--port=1",
    "127.0.0.1:9/x#",
]


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(BASE)), st.sampled_from(_PIECES) | st.text(max_size=8)),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_spec_loader(edits: list[tuple[int, str]]) -> None:
    """Random insertions into a valid spec: it loads, or fails with located error lines; nothing else."""
    text = BASE
    for pos, piece in edits:
        pos = min(pos, len(text))
        text = text[:pos] + piece + text[pos:]
    try:
        parse_spec(text, "fuzz.yaml")
    except SpecError as exc:
        for line in str(exc).splitlines():
            assert LOCATED.match(line) and line.startswith("fuzz.yaml"), line


@settings(max_examples=150, deadline=2000)
@given(st.text(alphabet=st.sampled_from("[]{}&*!|>-?:,'\"#%@` \n\tabc019.~"), max_size=200))
def test_fuzz_yaml_syntax(text: str) -> None:
    """Random YAML punctuation: a SpecError, never another exception."""
    try:
        parse_spec(text, "fuzz.yaml")
    except SpecError as exc:
        assert str(exc).startswith("fuzz.yaml")


def test_depth_limit_is_the_documented_one() -> None:
    ok = "cluster: {name: lab}\nx: " + "[" * (MAX_YAML_DEPTH - 2) + "]" * (MAX_YAML_DEPTH - 2) + "\n"
    with pytest.raises(SpecError) as info:
        parse_spec(ok)
    assert "nested deeper" not in str(info.value)  # an unknown key, but parsed
