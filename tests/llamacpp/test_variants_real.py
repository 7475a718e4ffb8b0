"""The project's llama.cpp build runs on this CPU with its best variant, and on any x86-64 CPU with its baseline.

"Any CPU" without owning every CPU: a copy of the build holding only the baseline CPU backend
(`libggml-cpu-x64.so`, SSE2 only) is what a CPU without any of the newer instructions would load; it must
answer a completion here. The full build must load the variant ggml's scoring picks for this CPU's flags
(`llamacpp_build.best_variant`, derived from /proc/cpuinfo) — whatever CPU this runs on — and answer too."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support import llamacpp_build as lb
from tests.support.llama_server import LlamaServerError, Served, serve


@pytest.fixture(scope="module")
def build() -> lb.LlamaCppBuild:
    try:
        return lb.ensure()
    except lb.LlamaCppBuildError as exc:
        pytest.fail(str(exc))


def _complete(server: Served) -> dict[str, object]:
    body = json.dumps({"prompt": "The capital of France is", "n_predict": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"{server.url}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        answer: dict[str, object] = json.loads(r.read())
    return answer


def test_the_build_holds_every_x86_variant_and_rpc(build: lb.LlamaCppBuild) -> None:
    assert build.server.is_file() and build.rpc_server.is_file()
    assert lb.BASELINE_VARIANT in build.variants
    assert {"haswell", "skylakex", "icelake", "zen4", "sapphirerapids"} <= set(build.variants)
    assert (build.bin / "libggml-rpc.so").is_file()
    data = json.loads((build.root / "build.json").read_text())
    assert "-DGGML_NATIVE=OFF" in data["cmake_options"] and "-DGGML_CPU_ALL_VARIANTS=ON" in data["cmake_options"]
    # Every library the executables link is found next to them (RUNPATH $ORIGIN), not in a build tree.
    for exe in (build.server, build.rpc_server):
        listed = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
        assert "not found" not in listed, listed
        own = [ln for ln in listed.splitlines() if "libllama" in ln or "libggml" in ln]
        assert own and all(str(build.bin) in ln for ln in own), listed


def test_the_best_variant_for_this_cpu_loads_and_answers(build: lb.LlamaCppBuild, gemma_file: Path) -> None:
    expected = lb.check_runs_here(build)
    assert expected == lb.best_variant(build.variants, lb.host_flags())
    with serve(gemma_file) as server:
        answer = _complete(server)
        log = server.log_text()
    assert lb.loaded_variant(log) == expected, log[-2000:]
    assert answer["tokens_predicted"] == 8 and isinstance(answer["content"], str) and answer["content"]


def test_only_the_baseline_variant_loads_and_answers(build: lb.LlamaCppBuild, gemma_file: Path, tmp_path: Path) -> None:
    """What a CPU with none of the newer instructions gets: the x64 backend, and still an answer."""
    server_path = build.only_variants(tmp_path / "bin", [lb.BASELINE_VARIANT])
    with serve(gemma_file, binary=str(server_path), cwd=tmp_path) as server:
        answer = _complete(server)
        log = server.log_text()
    assert lb.loaded_variant(log) == lb.BASELINE_VARIANT, log[-2000:]
    assert answer["tokens_predicted"] == 8


def test_a_build_without_any_cpu_backend_is_a_clear_error(
    build: lb.LlamaCppBuild, gemma_file: Path, tmp_path: Path
) -> None:
    """No CPU backend the CPU can run: llama-server stops with a message, not a crash in a kernel."""
    server_path = build.only_variants(tmp_path / "bin", [])
    with (
        pytest.raises(LlamaServerError, match=r"llama-server ended \(exit"),
        serve(gemma_file, binary=str(server_path), cwd=tmp_path, timeout_s=60),
    ):
        pass
