"""Malformed specs: each gives exactly one clear, located error line and exit status 1.

Every case is a small edit of a valid spec (`BASE`). The expected output names the
file, the line, the path in the document and what is wrong — and never a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from specs import SpecError, parse_spec

BASE = """\
cluster:
  name: lab
nodes:
  - name: gpu-box
    tier: remote
    address: 10.0.0.2
    docker: {endpoint: "unix:///var/run/docker.sock"}
    gpus:
      - {index: 0, name: RTX 3090, vram: 24GiB}
    ram: 64GiB
    llamacpp: {image: "llama:local", ports: 3000-3009}
  - name: nas
    tier: cpu
    address: 10.0.0.3
    ram: 16GiB
    ollama: {url: "http://10.0.0.3:11434"}
models:
  - name: coder
    runtime: llamacpp
    source: {gguf: /models/coder.gguf}
    categories: [code]
  - name: small
    runtime: ollama
    source: {ollama: "qwen2.5:0.5b"}
    categories: [fast]
"""


def edit(old: str, new: str, *, count: int = 1) -> str:
    assert BASE.count(old) >= count, f"{old!r} not in BASE"
    return BASE.replace(old, new, count)


# (id, spec text, expected line, regex for "path: message" after "spec.yaml:LINE:COL: ")
CASES: list[tuple[str, str, int, str]] = [
    ("yaml-unclosed-flow", edit("categories: [code]", "categories: [code"), 22, r"YAML syntax error: "),
    ("yaml-tab-indent", edit("  name: lab", "\tname: lab"), 2, r"YAML syntax error: "),
    (
        "yaml-duplicate-key",
        edit("  name: lab\n", "  name: lab\n  name: lab2\n"),
        3,
        r'YAML syntax error: duplicate key "name"',
    ),
    ("empty-file", "", 1, r"the file is empty"),
    ("top-level-list", "- a\n- b\n", 1, r"the document must be a mapping"),
    ("unknown-top-level-key", edit("cluster:", "clusters:"), 1, r"clusters: unknown key \(did you mean 'cluster'\?\)"),
    (
        "unknown-node-key",
        edit("    tier: remote\n", "    tier: remote\n    gpu: yes\n"),
        6,
        r"nodes\[0\]\.gpu: unknown key \(did you mean 'gpus'\?\)",
    ),
    (
        "unknown-model-key",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    contxt: 8192\n"),
        20,
        r"models\[0\]\.contxt: unknown key \(did you mean 'context'\?\)",
    ),
    (
        "missing-cluster-name",
        edit("cluster:\n  name: lab\n", "cluster: {}\n"),
        1,
        r"cluster: missing required key 'name'",
    ),
    ("missing-nodes", "cluster:\n  name: lab\n", 1, r"missing required key 'nodes'"),
    ("empty-nodes", "cluster:\n  name: lab\nnodes: []\n", 3, r"nodes: must have at least 1 item"),
    (
        "bad-tier",
        edit("tier: remote", "tier: gpu"),
        5,
        r"nodes\[0\]\.tier: must be one of 'local', 'remote' or 'cpu' \(got 'gpu'\)",
    ),
    (
        "bad-runtime",
        edit("runtime: ollama", "runtime: vllm"),
        23,
        r"models\[1\]\.runtime: must be one of 'ollama' or 'llamacpp' \(got 'vllm'\)",
    ),
    (
        "context-not-int",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    context: big\n"),
        20,
        r"models\[0\]\.context: must be an integer \(got 'big'\)",
    ),
    (
        "context-zero",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    context: 0\n"),
        20,
        r"models\[0\]\.context: must be greater than 0 \(got 0\)",
    ),
    (
        "context-negative",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    context: -8192\n"),
        20,
        r"models\[0\]\.context: must be greater than 0 \(got -8192\)",
    ),
    ("negative-ram", edit("ram: 64GiB", "ram: -4GiB"), 10, r"nodes\[0\]\.ram: must not be negative"),
    (
        "bad-size-unit",
        edit("vram: 24GiB", "vram: 24 bananas"),
        9,
        r"nodes\[0\]\.gpus\[0\]\.vram: unknown size unit 'bananas'",
    ),
    (
        "reserve-exceeds-vram",
        edit("vram: 24GiB}", "vram: 24GiB, reserve: 30GiB}"),
        9,
        r"nodes\[0\]\.gpus\[0\]\.reserve: must be smaller than vram \(24\.0 GiB\)",
    ),
    (
        "port-range-reversed",
        edit("ports: 3000-3009", "ports: 3009-3000"),
        11,
        r"nodes\[0\]\.llamacpp\.ports: range end 3000 is below its start 3009",
    ),
    (
        "port-too-large",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    port: 70000\n"),
        20,
        r"models\[0\]\.port: must be at most 65535",
    ),
    (
        "unknown-category",
        edit("categories: [fast]", "categories: [poetry]"),
        25,
        r"models\[1\]\.categories\[0\]: must be one of 'code', 'reason', 'chat', 'vision', 'fast' or 'embed' \(got 'poetry'\)",
    ),
    (
        "categories-not-list",
        edit("categories: [fast]", "categories: fast"),
        25,
        r"models\[1\]\.categories: must be a list \(got 'fast'\)",
    ),
    (
        "duplicate-node-name",
        edit("name: nas", "name: gpu-box"),
        12,
        r"nodes\[1\]\.name: duplicate node name 'gpu-box' \(also nodes\[0\]\)",
    ),
    (
        "duplicate-model-name",
        edit("name: small", "name: coder"),
        22,
        r"models\[1\]\.name: duplicate model name 'coder' \(also models\[0\]\)",
    ),
    (
        "duplicate-gpu-index",
        edit(
            "      - {index: 0, name: RTX 3090, vram: 24GiB}\n",
            "      - {index: 0, name: RTX 3090, vram: 24GiB}\n      - {index: 0, name: RTX 3060, vram: 12GiB}\n",
        ),
        10,
        r"nodes\[0\]\.gpus\[1\]\.index: GPU index 0 is used twice on node 'gpu-box'",
    ),
    (
        "pin-unknown-node",
        edit("    categories: [code]\n", "    categories: [code]\n    placement: {node: gpu-box2}\n"),
        22,
        r"models\[0\]\.placement\.node: unknown node 'gpu-box2' \(nodes: gpu-box, nas\)",
    ),
    (
        "pin-node-without-runtime",
        edit("    categories: [fast]\n", "    categories: [fast]\n    placement: {node: gpu-box}\n"),
        26,
        r"models\[1\]\.placement\.node: node 'gpu-box' does not offer the ollama runtime",
    ),
    (
        "pin-missing-gpu",
        edit("    categories: [code]\n", "    categories: [code]\n    placement: {node: gpu-box, gpus: [1]}\n"),
        22,
        r"models\[0\]\.placement\.gpus\[0\]: node 'gpu-box' has no GPU 1 \(GPUs: 0\)",
    ),
    (
        "routing-unknown-model",
        BASE + "routing:\n  categories:\n    code: {models: [coder, codr]}\n",
        28,
        r"routing\.categories\.code\.models\[1\]: unknown model 'codr'",
    ),
    (
        "routing-fallback-cycle",
        BASE
        + "routing:\n  categories:\n    code: {models: [coder], fallback: fast}\n    fast: {models: [small], fallback: code}\n",
        28,
        r"routing\.categories\.code\.fallback: fallback cycle: code → fast → code",
    ),
    (
        "routing-unknown-category",
        BASE + "routing:\n  categories:\n    poetry: {models: [small]}\n",
        28,
        r"routing\.categories\.poetry: must be one of 'code'",
    ),
    (
        "secret-literal-in-secrets",
        BASE + "secrets:\n  litellm: sk-live-0123456789abcdef\n",
        27,
        r"secrets\.litellm: must be a secret reference \(env:NAME, file:/path or cmd:COMMAND\); literal secret values are not allowed",
    ),
    (
        "secret-literal-master-key",
        BASE + "gateway:\n  master_key: sk-live-0123456789abcdef\n",
        27,
        r"gateway\.master_key: must be a secret reference",
    ),
    (
        "secret-unknown-name",
        BASE + "gateway:\n  master_key: secret:litellm\n",
        27,
        r"gateway\.master_key: unknown secret 'litellm' \(secrets: none\)",
    ),
    (
        "wake-stdin-unknown-secret",
        edit("    tier: cpu\n", "    tier: cpu\n    wake: {command: plug-on, stdin: 'secret:plug'}\n"),
        14,
        r"nodes\[1\]\.wake\.stdin: unknown secret 'plug' \(secrets: none\)",
    ),
    (
        "wake-stdin-with-wol",
        edit("    tier: cpu\n", "    tier: cpu\n    wake: {wol: {mac: 'aa:bb:cc:dd:ee:ff'}, stdin: 'env:PLUG'}\n"),
        14,
        r"nodes\[1\]\.wake\.stdin: is for a wake `command`",
    ),
    (
        "secret-file-relative",
        BASE + "secrets:\n  key: file:secrets/key.txt\n",
        27,
        r"secrets\.key: file: reference needs an absolute path",
    ),
    (
        "password-in-ssh",
        edit("    tier: cpu\n", "    tier: cpu\n    ssh: {user: admin, password: hunter2}\n"),
        14,
        r"nodes\[1\]\.ssh\.password: unknown key",
    ),
    (
        "same-port-same-node",
        edit(
            "    categories: [code]\n",
            "    categories: [code]\n    port: 3001\n    placement: {node: gpu-box}\n  - name: coder2\n    runtime: llamacpp\n    source: {gguf: /models/coder2.gguf}\n    port: 3001\n    placement: {node: gpu-box}\n",
        ),
        27,
        r"models\[1\]\.port: port 3001 on node 'gpu-box' is also used by model 'coder'",
    ),
    (
        "port-outside-range",
        edit("    categories: [code]\n", "    categories: [code]\n    port: 8080\n    placement: {node: gpu-box}\n"),
        22,
        r"models\[0\]\.port: port 8080 is outside node 'gpu-box' llama\.cpp ports 3000-3009",
    ),
    (
        "llamacpp-with-ollama-source",
        edit("source: {gguf: /models/coder.gguf}", 'source: {ollama: "qwen2.5-coder:7b"}'),
        20,
        r"models\[0\]\.source: a llamacpp model needs a `gguf` source",
    ),
    (
        "source-both-kinds",
        edit("source: {gguf: /models/coder.gguf}", 'source: {gguf: /models/coder.gguf, ollama: "x:1"}'),
        20,
        r"models\[0\]\.source: give exactly one of `gguf` \(a file path\) or `ollama` \(a tag\)",
    ),
    (
        "source-volume-without-node",
        edit("source: {gguf: /models/coder.gguf}", "source: {gguf: /v/llm/_data/coder.gguf, volume: llm}"),
        20,
        r"models\[0\]\.source\.volume: needs `node`, the node whose Docker engine has the volume",
    ),
    (
        "source-volume-path-not-under-it",
        edit("source: {gguf: /models/coder.gguf}", "source: {gguf: /models/coder.gguf, volume: llm, node: gpu-box}"),
        20,
        r"models\[0\]\.source\.gguf: with `volume: llm`, give the file's path under the volume's mountpoint"
        r" \(…/volumes/llm/_data/FILE, as `docker volume inspect` shows it\)",
    ),
    (
        "source-volume-path-escapes",
        edit(
            "source: {gguf: /models/coder.gguf}", "source: {gguf: /v/llm/_data/../x.gguf, volume: llm, node: gpu-box}"
        ),
        20,
        r"models\[0\]\.source\.gguf: with `volume: llm`, give the file's path under",
    ),
    (
        "ollama-source-with-volume",
        edit('source: {ollama: "qwen2.5:0.5b"}', 'source: {ollama: "qwen2.5:0.5b", volume: llm}'),
        24,
        r"models\[1\]\.source: `node`, `sha256` and `volume` belong to a `gguf` source, not an `ollama` one",
    ),
    (
        "bad-duration",
        BASE + "health:\n  interval: 5 parsecs\n",
        27,
        r"health\.interval: is not a duration: '5 parsecs'",
    ),
    (
        "name-with-space",
        edit("name: small", "name: small model"),
        22,
        r"models\[1\]\.name: must be a name made of letters, digits",
    ),
    (
        "bool-for-int",
        edit("    runtime: ollama\n", "    runtime: ollama\n    replicas: true\n"),
        24,
        r"models\[1\]\.replicas: must be an integer \(got true\)",
    ),
    (
        "health-timeout-unknown-target",
        BASE + "health:\n  timeouts:\n    gpu-box2: 8s\n",
        28,
        r"health\.timeouts\.gpu-box2: 'gpu-box2' is not a node, a model or `gateway`",
    ),
    (
        "wake-both",
        edit(
            "    tier: remote\n",
            '    tier: remote\n    wake: {command: "ipmitool power on", wol: {mac: "aa:bb:cc:dd:ee:ff"}}\n',
        ),
        6,
        r"nodes\[0\]\.wake: give exactly one of `wol` or `command`",
    ),
    (
        "wake-bad-mac",
        edit("    tier: remote\n", '    tier: remote\n    wake: {wol: {mac: "aa:bb:cc"}}\n'),
        6,
        r"nodes\[0\]\.wake\.wol\.mac: must be a MAC address",
    ),
    (
        "quantized-kv-without-fa",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    kv_cache: q8_0\n    flash_attn: false\n"),
        20,
        r"models\[0\]\.kv_cache: a quantized KV cache needs flash_attn: true",
    ),
    (
        "docker-endpoint-scheme",
        edit('endpoint: "unix:///var/run/docker.sock"', 'endpoint: "http://10.0.0.2:2375"'),
        7,
        r"nodes\[0\]\.docker\.endpoint: must start with unix://, tcp:// or ssh://",
    ),
    (
        "ollama-url-scheme",
        edit('url: "http://10.0.0.3:11434"', 'url: "10.0.0.3:11434"'),
        16,
        r"nodes\[1\]\.ollama\.url: must be a URL starting with http:// or https://",
    ),
    (
        "replicas-exceed-nodes",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    replicas: 2\n"),
        20,
        r"models\[0\]\.replicas: 2 replicas need 2 different nodes offering llamacpp; there are 1",
    ),
    (
        "no-runtime-on-node",
        edit('    ollama: {url: "http://10.0.0.3:11434"}\n', ""),
        12,
        r"nodes\[1\]: a node needs at least one runtime",
    ),
    (
        "llamacpp-without-docker",
        edit('    docker: {endpoint: "unix:///var/run/docker.sock"}\n', ""),
        10,
        r"nodes\[0\]\.llamacpp: needs `docker` on the node",
    ),
    (
        "bad-regex-rule",
        BASE + "routing:\n  rules:\n    code:\n      patterns: ['def (']\n",
        29,
        r"routing\.rules\.code\.patterns\[0\]: not a valid regular expression",
    ),
    ("unknown-version", "version: 2\n" + BASE, 1, r"version: must be 1 \(got 2\)"),
    (
        "power-without-wake",
        edit("    ram: 16GiB\n", "    ram: 16GiB\n    ssh: {user: homelab}\n    power: {sleep_after: 30m}\n"),
        17,
        r"nodes\[1\]\.power: needs `wake` \(wol or command\)",
    ),
    (
        "power-without-ssh",
        edit("    ram: 16GiB\n", "    ram: 16GiB\n    wake: {command: wake-nas}\n    power: {sleep_after: 30m}\n"),
        17,
        r"nodes\[1\]\.power: needs `ssh`: the sleep command runs on the node over SSH",
    ),
    (
        "power-on-the-gateway-node",
        edit(
            "    ram: 16GiB\n",
            "    ram: 16GiB\n    ssh: {user: homelab}\n    wake: {command: wake-nas}\n    power: {sleep_after: 30m}\n",
        )
        + "gateway: {node: nas, mode: process, master_key: 'env:KEY'}\n",
        18,
        r"nodes\[1\]\.power: node 'nas' runs the gateway and cannot sleep",
    ),
    (
        "power-on-the-machine-homelab-runs-on",
        edit(
            "    address: 10.0.0.3\n    ram: 16GiB\n",
            "    address: 127.0.0.1\n    ram: 16GiB\n    wake: {command: wake-nas}\n    power: {sleep_after: 30m}\n",
        ),
        17,
        r"nodes\[1\]\.power: node 'nas' is the machine homelab runs on and cannot sleep",
    ),
    (
        "power-bad-on-request",
        edit("    ram: 16GiB\n", "    ram: 16GiB\n    power: {on_request: later}\n"),
        16,
        r"nodes\[1\]\.power\.on_request: must be 'wait' or 'fallback'",
    ),
    (
        "power-zero-sleep-after",
        edit("    ram: 16GiB\n", "    ram: 16GiB\n    power: {sleep_after: 0s}\n"),
        16,
        r"nodes\[1\]\.power\.sleep_after: must be greater than 0",
    ),
    (
        "ttl-on-pinned-model",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    ttl: 5m\n"),
        20,
        r"models\[0\]\.ttl: is for `residency: on-demand` models \(a pinned model is never unloaded\)$",
    ),
    (
        "on-demand-with-port",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    residency: on-demand\n    port: 3001\n"),
        21,
        r"models\[0\]\.port: not with `residency: on-demand` \(an on-demand model is one member of a swap pool\)$",
    ),
    (
        "on-demand-split",
        edit(
            "    runtime: llamacpp\n", "    runtime: llamacpp\n    residency: on-demand\n    placement: {split: true}\n"
        ),
        21,
        r"models\[0\]\.placement\.split: not with `residency: on-demand`",
    ),
    (
        "on-demand-preload",
        edit("    runtime: ollama\n", "    runtime: ollama\n    residency: on-demand\n    preload: true\n"),
        25,
        r"models\[1\]\.preload: not with `residency: on-demand`",
    ),
    (
        "residency-unknown",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    residency: sometimes\n"),
        20,
        r"models\[0\]\.residency: ",
    ),
    (
        "ttl-not-a-duration",
        edit("    runtime: llamacpp\n", "    runtime: llamacpp\n    residency: on-demand\n    ttl: soon\n"),
        21,
        r"models\[0\]\.ttl: ",
    ),
    (
        "max-loaded-zero",
        edit("ports: 3000-3009}", "ports: 3000-3009, max_loaded: 0}"),
        11,
        r"nodes\[0\]\.llamacpp\.max_loaded: ",
    ),
    (
        "ollama-max-loaded-too-many",
        edit('url: "http://10.0.0.3:11434"}', 'url: "http://10.0.0.3:11434", max_loaded: 65}'),
        16,
        r"nodes\[1\]\.ollama\.max_loaded: ",
    ),
]

LINE_RE = re.compile(r"^spec\.yaml:(?P<line>\d+):(?P<col>\d+): (?P<rest>.+)$")


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


def test_base_is_valid() -> None:
    loaded = parse_spec(BASE, "spec.yaml")
    assert [m.name for m in loaded.spec.models] == ["coder", "small"]


@pytest.mark.parametrize(("text", "line", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_spec_gives_one_located_error(tmp_path: Path, text: str, line: int, pattern: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    proc = _run_validate(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert lines[-1] == "1 error in spec.yaml", proc.stderr
    assert len(lines) == 2, proc.stderr
    match = LINE_RE.match(lines[0])
    assert match is not None, lines[0]
    assert int(match["line"]) == line, lines[0]
    assert int(match["col"]) >= 1
    assert re.match(pattern, match["rest"]), lines[0]
    assert proc.stdout == ""


def _run_validate(cwd: Path) -> subprocess.CompletedProcess[str]:
    """`homelab validate -f spec.yaml` in `cwd`, in-process (fast), as a CompletedProcess."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, ["validate", "-f", "spec.yaml"])
    finally:
        os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess([], result.exit_code, result.stdout, result.stderr)


def test_secret_values_are_never_echoed(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE + "gateway:\n  master_key: sk-live-0123456789abcdef\nsecrets:\n  other: hunter2hunter2\n")
    proc = _run_validate(tmp_path)
    assert proc.returncode == 1
    assert "sk-live" not in proc.stderr
    assert "hunter2" not in proc.stderr
    assert proc.stderr.count("literal secret values are not allowed") == 2


def test_all_errors_are_reported_in_one_run() -> None:
    text = edit("tier: remote", "tier: gpu").replace("context", "x").replace("ram: 16GiB", "ram: lots")
    text = text.replace("name: small", "name: coder") + "routing:\n  categories:\n    code: {models: [nope]}\n"
    with pytest.raises(SpecError) as info:
        parse_spec(text, "spec.yaml")
    messages = [str(d) for d in info.value.diagnostics]
    # Structure errors come first; cross-references are checked once the structure is valid.
    assert messages == [
        "spec.yaml:5:11: nodes[0].tier: must be one of 'local', 'remote' or 'cpu' (got 'gpu')",
        "spec.yaml:15:10: nodes[1].ram: is not a size: 'lots' (use e.g. 24GiB, 9.0 GB or 512MiB)",
    ]
    fixed = text.replace("tier: gpu", "tier: remote").replace("ram: lots", "ram: 16GiB")
    with pytest.raises(SpecError) as info:
        parse_spec(fixed, "spec.yaml")
    assert [str(d) for d in info.value.diagnostics] == [
        "spec.yaml:22:11: models[1].name: duplicate model name 'coder' (also models[0])",
        "spec.yaml:28:21: routing.categories.code.models[0]: unknown model 'nope' (models: coder)",
    ]


def test_columns_point_at_the_value() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(edit("tier: remote", "tier: gpu"), "spec.yaml")
    (d,) = info.value.diagnostics
    assert (d.line, d.column) == (5, 11)  # "    tier: gpu" → the value starts at column 11
    with pytest.raises(SpecError) as info:
        parse_spec(edit("    tier: remote\n", "    tier: remote\n    gpu: yes\n"), "spec.yaml")
    (d,) = info.value.diagnostics
    assert (d.line, d.column) == (6, 5)  # an unknown key points at the key


def test_entry_point_prints_no_traceback(tmp_path: Path) -> None:
    """The installed console script, run as a user runs it."""
    spec = tmp_path / "cluster.yaml"
    spec.write_text("cluster: [\n")
    proc = subprocess.run(
        [sys.executable, "-m", "controller", "validate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("cluster.yaml:2:1: YAML syntax error")
