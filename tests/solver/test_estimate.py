"""The memory estimator on hand-computed cases, and the `homelab estimate` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from controller.commands.estimate import register
from solver.errors import EstimateError
from solver.estimate import (
    DEFAULT_GPU_OVERHEAD_BYTES,
    EstimateParams,
    LayerShape,
    MemoryBreakdown,
    ModelShape,
    estimate,
    estimate_all,
    kv_layer_bytes,
    layer_curve,
    max_gpu_layers,
    shape_from_header,
    shape_from_model_info,
)
from solver.gguf import read_header
from specs.enums import KVCacheType, LayerOrder
from tests.support.synth import SynthShape

MIB = 1 << 20


def toy(weights: tuple[int, ...] = (100, 200, 300, 400), tied: bool = False) -> ModelShape:
    """Four blocks of different sizes, a 1000-byte embedding and a 50-byte output layer."""
    return ModelShape(
        name="toy",
        arch="llama",
        n_embd=64,
        n_vocab=128,
        n_ff=128,
        head_dim_k=16,
        head_dim_v=16,
        layers=tuple(LayerShape(weights=w, n_head=4, n_head_kv=2, largest_matrix=w // 2) for w in weights),
        input_weights=1000,
        output_weights=1000 if tied else 50,
        output_tied=tied,
        output_tied_copy=1000 if tied else 0,
    )


def llama_like(n_layer: int, n_head_kv: int, head_dim: int, swa_every: int = 0, n_swa: int = 0) -> ModelShape:
    return ModelShape(
        name="x",
        arch="gemma3" if swa_every else "llama",
        n_embd=4096,
        n_vocab=128256,
        n_ff=14336,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        layers=tuple(
            LayerShape(
                weights=1,
                n_head=32,
                n_head_kv=n_head_kv,
                swa=bool(swa_every) and il % swa_every < swa_every - 1,
            )
            for il in range(n_layer)
        ),
        input_weights=0,
        output_weights=0,
        n_swa=n_swa,
    )


# ---------------------------------------------------------------- weights placement


@pytest.mark.parametrize(
    ("order", "ngl", "gpu", "cpu"),
    [
        # recent llama.cpp: the output layer first, then the last ngl-1 blocks
        (LayerOrder.OUTPUT_FIRST, 0, 0, 1000 + 1000 + 50),
        (LayerOrder.OUTPUT_FIRST, 1, 50, 1000 + 1000),
        (LayerOrder.OUTPUT_FIRST, 2, 50 + 400, 1000 + 600),
        (LayerOrder.OUTPUT_FIRST, 4, 50 + 900, 1000 + 100),
        (LayerOrder.OUTPUT_FIRST, 5, 50 + 1000, 1000),
        # older llama.cpp: the last ngl blocks, the output layer only at L+1
        (LayerOrder.OUTPUT_LAST, 1, 400, 1000 + 600 + 50),
        (LayerOrder.OUTPUT_LAST, 2, 700, 1000 + 300 + 50),
        (LayerOrder.OUTPUT_LAST, 4, 1000, 1000 + 50),
        (LayerOrder.OUTPUT_LAST, 5, 1050, 1000),
    ],
)
def test_weights_follow_layer_order(order: LayerOrder, ngl: int, gpu: int, cpu: int) -> None:
    b = estimate(toy(), ngl, EstimateParams(ctx=512, layer_order=order))
    assert (b.weights_gpu, b.weights_cpu) == (gpu, cpu)
    assert b.layers == 4 and b.gpu_layers == ngl


def test_tied_output_copies_embedding_to_gpu() -> None:
    shape = toy(tied=True)
    on_cpu = estimate(shape, 0, EstimateParams(ctx=512))
    on_gpu = estimate(shape, 1, EstimateParams(ctx=512))
    assert on_cpu.weights_cpu == 1000 + 1000  # token_embd serves as output too: counted once
    assert on_gpu.weights_gpu == 1000  # a GPU copy of token_embd
    assert on_gpu.weights_cpu == 1000 + 1000


def test_kv_follows_its_layer() -> None:
    params = EstimateParams(ctx=1024, layer_order=LayerOrder.OUTPUT_FIRST)
    per_layer = kv_layer_bytes(toy(), params)
    assert per_layer == (1024 * 2 * 16 * 2 * 2,) * 4  # cells x (K + V) x H_kv x d x f16
    b = estimate(toy(), 3, params)  # output + blocks 2, 3
    assert b.kv_gpu == 2 * per_layer[0] and b.kv_cpu == 2 * per_layer[0]


# ---------------------------------------------------------------- KV cache by hand


@pytest.mark.parametrize(
    ("cache", "mib"),
    [(KVCacheType.F16, 1024), (KVCacheType.Q8_0, 544), (KVCacheType.Q4_0, 288)],
)
def test_kv_llama3_8b(cache: KVCacheType, mib: int) -> None:
    """Llama-3-8B at 8192: 32 layers x 8192 cells x 2 x 8 heads x 128 (reference worked example)."""
    shape = llama_like(32, 8, 128)
    b = estimate(shape, 33, EstimateParams(ctx=8192, cache_type=cache))
    assert b.kv_gpu == mib * MIB and b.kv_cpu == 0


def test_kv_gemma3_12b_sliding_window() -> None:
    """Gemma-3-12B at 8k, one sequence: 992 MiB against 3072 MiB without SWA."""
    shape = llama_like(48, 8, 256, swa_every=6, n_swa=1024)
    b = estimate(shape, 0, EstimateParams(ctx=8192, n_seq=1, gpu=False))
    assert b.kv_cpu == 992 * MIB
    dense = llama_like(48, 8, 256)
    assert estimate(dense, 0, EstimateParams(ctx=8192, n_seq=1, gpu=False)).kv_cpu == 3072 * MIB


def test_kv_cells_are_padded_to_256() -> None:
    shape = llama_like(1, 1, 128)
    b = estimate(shape, 0, EstimateParams(ctx=1000, gpu=False))
    assert b.kv_cpu == 1024 * 128 * 2 * 2


# ---------------------------------------------------------------- compute and fixed parts


def test_compute_and_overhead_by_offload_regime() -> None:
    params = EstimateParams(ctx=512, gpu_overhead=300 * MIB)
    levels = estimate_all(toy(), params)
    full, partial, none = levels[-1], levels[2], levels[0]
    assert all(b.overhead_gpu == 300 * MIB for b in levels)
    embd = 4 * 512 * 64  # one T x E f32 tensor (T = 512 tokens, E = 64)
    # full offload: the embeddings come from the host, the GPU graph lacks two T x E tensors
    # (measured on an H100, bench/gpu_memory.py)
    assert partial.compute_gpu - (full.compute_gpu + 2 * embd) == 150  # block 2 (300 bytes) on the CPU, largest 150
    assert none.compute_gpu - (full.compute_gpu + 2 * embd) == 200
    # with a GPU the host keeps the graph inputs and the embeddings at every level
    assert full.compute_cpu == partial.compute_cpu == none.compute_cpu
    # without one the host runs the whole graph
    cpu_only = estimate(toy(), 0, EstimateParams(ctx=512, gpu=False))
    assert cpu_only.total_gpu == 0 and cpu_only.compute_cpu == full.compute_gpu + 2 * embd


def test_default_overhead_is_exported() -> None:
    assert 256 * MIB <= DEFAULT_GPU_OVERHEAD_BYTES <= 1024 * MIB
    assert estimate(toy(), 5, EstimateParams(ctx=512)).overhead_gpu == DEFAULT_GPU_OVERHEAD_BYTES


def test_totals_add_up() -> None:
    b = estimate(toy(), 3, EstimateParams(ctx=2048))
    assert b.total_gpu == b.weights_gpu + b.kv_gpu + b.compute_gpu + b.overhead_gpu
    assert b.total_cpu == b.weights_cpu + b.kv_cpu + b.compute_cpu + b.output_cpu + b.repack_cpu
    assert set(b.to_json()) >= {
        "layers", "gpu_layers", "weights_gpu", "weights_cpu", "kv_gpu", "kv_cpu", "compute_gpu",
        "compute_cpu", "overhead_gpu", "total_gpu", "total_cpu",
    }  # fmt: skip


def test_declared() -> None:
    b = MemoryBreakdown.from_declared(vram_bytes=5 * 2**30, ram_bytes=2**30)
    assert (b.total_gpu, b.total_cpu, b.declared) == (5 * 2**30, 2**30, True)
    with pytest.raises(EstimateError):
        MemoryBreakdown.from_declared(-1, 0)


# ---------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    ("ngl", "params", "match"),
    [
        (6, EstimateParams(ctx=512), "between 0 and 5"),
        (-1, EstimateParams(ctx=512), "between 0 and 5"),
        (1, EstimateParams(ctx=0), "context length must be positive"),
        (1, EstimateParams(ctx=-4), "context length must be positive"),
        (1, EstimateParams(ctx=512, cache_type=KVCacheType.Q4_0, flash_attn=False), "needs flash attention"),
        (1, EstimateParams(ctx=512, gpu=False), "without a GPU"),
        (1, EstimateParams(ctx=512, gpu_overhead=-1), "overhead"),
    ],
)
def test_bad_parameters(ngl: int, params: EstimateParams, match: str) -> None:
    with pytest.raises(EstimateError, match=match):
        estimate(toy(), ngl, params)


# ---------------------------------------------------------------- from a real header


def test_per_block_weights_are_real_sizes(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    """mqa-mixed has F16, Q8_0 and F32 blocks: each block's bytes computed by hand."""
    synth, path = synth_files["mqa-mixed"]
    shape = shape_from_header(read_header(path))
    e, kv, ff = 384, 64, 1024
    elements = e * e * 2 + e * kv * 2 + 3 * e * ff
    norms = 2 * e * 4
    by_type = {"F16": elements * 2, "Q8_0": elements // 32 * 34, "F32": elements * 4}
    assert [lay.weights for lay in shape.layers] == [by_type[t.name] + norms for t in synth.block_types or ()]
    assert shape.input_weights == e * 3072 // 32 * 34  # token_embd Q8_0
    assert shape.output_weights == e * 3072 * 2 + e * 4  # output F16 + output_norm
    assert shape.weights_total == read_header(path).tensor_bytes


def test_model_info_without_tensors(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    """Ollama's model_info carries the keys but no tensors: sizes from shapes stay within 1%."""
    for name, quant in (("gqa-f16", "F16"), ("gqa-q8", "Q8_0")):
        _, path = synth_files[name]
        header = read_header(path)
        model_info = {k: v for k, v in header.metadata.items() if not k.startswith("tokenizer.")}
        guessed = shape_from_model_info(model_info, quant)
        exact = shape_from_header(header)
        assert guessed.n_layer == exact.n_layer
        assert guessed.weights_total == pytest.approx(exact.weights_total, rel=0.01)
        p = EstimateParams(ctx=4096)
        assert estimate(guessed, 3, p).kv_gpu == estimate(exact, 3, p).kv_gpu


def test_model_info_needs_quantization() -> None:
    from solver.errors import GGUFError

    info = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
            "llama.attention.head_count": 4, "llama.vocab_size": 100}  # fmt: skip
    with pytest.raises(GGUFError, match="unknown quantization"):
        shape_from_model_info(info)
    assert shape_from_model_info(info, "q4_k_m").n_layer == 2


def test_max_gpu_layers_and_curve(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    for name in ("gqa-q8", "mqa-mixed"):
        shape = shape_from_header(read_header(synth_files[name][1]))
        for order in LayerOrder:
            params = EstimateParams(ctx=2048, layer_order=order)
            levels = estimate_all(shape, params)
            curve = layer_curve(shape, params)
            for b in levels:
                # the linear model never under-estimates, and is exact at the ends
                assert curve.vram(b.gpu_layers) >= b.total_gpu
                assert curve.ram(b.gpu_layers) >= b.total_cpu
            assert curve.vram(0) == levels[0].total_gpu
            assert curve.vram(shape.n_layer + 1) == levels[-1].total_gpu
            for b in levels:
                best = max_gpu_layers(shape, b.total_gpu, params)
                assert best is not None and best >= b.gpu_layers
                assert estimate(shape, best, params).total_gpu <= b.total_gpu
            assert max_gpu_layers(shape, levels[0].total_gpu - 1, params) is None


def test_curve_is_exact_for_uniform_blocks(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    shape = shape_from_header(read_header(synth_files["gqa-f16"][1]))
    params = EstimateParams(ctx=4096)
    curve = layer_curve(shape, params)
    for b in estimate_all(shape, params):
        assert curve.vram(b.gpu_layers) == b.total_gpu


def test_gemma_swa_layers(gemma_file: Path) -> None:
    shape = shape_from_header(read_header(gemma_file))
    assert shape.n_layer == 18 and shape.output_tied
    assert [il for il, lay in enumerate(shape.layers) if not lay.swa] == [5, 11, 17]


# ---------------------------------------------------------------- CLI


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Throwaway app standing in for controller.cli."""

    register(app)
    return app


def test_cli_table(cli: typer.Typer, synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    _, path = synth_files["gqa-f16"]
    result = CliRunner().invoke(cli, ["estimate", str(path), "--ctx", "2048"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert [int(r.split("│")[1]) for r in rows] == list(range(8))  # ngl 0 … L+1 for 6 blocks


def test_cli_json(cli: typer.Typer, synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    _, path = synth_files["gqa-q8"]
    args = ["estimate", str(path), "--ctx", "1024", "--ngl", "5", "--cache-type", "q8_0", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert all(isinstance(v, int) for v in data.values())
    assert data["layers"] == 12 and data["gpu_layers"] == 5
    # 4 blocks of KV on the GPU: 4 x 1024 cells x 2 x 256 x 34/32
    assert data["kv_gpu"] == 4 * 1024 * 2 * 256 // 32 * 34
    assert data["total_gpu"] == data["weights_gpu"] + data["kv_gpu"] + data["compute_gpu"] + data["overhead_gpu"]


def test_cli_breakdown(cli: typer.Typer, gemma_file: Path) -> None:
    result = CliRunner().invoke(cli, ["estimate", str(gemma_file), "--ngl", "19", "--no-flash-attn"])
    assert result.exit_code == 0, result.output
    assert "KV cache" in result.stdout and "total" in result.stdout


@pytest.mark.parametrize("ngl", ["-1", "8", "99", "999"])
def test_cli_all_layers_as_llama_cpp_writes_it(
    cli: typer.Typer, synth_files: dict[str, tuple[SynthShape, Path]], ngl: str
) -> None:
    """-ngl 99, 999 or -1 mean every layer (L+1 = 7 for the 6 blocks of gqa-f16), as in llama.cpp."""
    _, path = synth_files["gqa-f16"]
    full = CliRunner().invoke(cli, ["estimate", str(path), "--ngl", "7", "--json"])
    result = CliRunner().invoke(cli, ["estimate", str(path), "--ngl", ngl, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(full.stdout)
    assert json.loads(result.stdout)["gpu_layers"] == 7
    table = CliRunner().invoke(cli, ["estimate", str(path), "--ngl", ngl])
    assert table.exit_code == 0 and "ngl 7/7" in table.stdout


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (None, [], "no such file"),
        (b"hello, not a model\n" * 3, [], "not a GGUF file"),
        ("truncate", [], "truncated"),
        ("synth", ["--ngl", "-2"], "ngl must be between 0 and 7"),
        ("synth", ["--ngl", "99", "--cpu"], "ngl must be 0 on a node without a GPU"),
        ("synth", ["--ctx", "-1"], "context length must be positive"),
    ],
)
def test_cli_bad_input(
    cli: typer.Typer,
    tmp_path: Path,
    synth_files: dict[str, tuple[SynthShape, Path]],
    make: bytes | str | None,
    args: list[str],
    message: str,
) -> None:
    path = tmp_path / "model.gguf"
    src = synth_files["gqa-f16"][1]
    if isinstance(make, bytes):
        path.write_bytes(make)
    elif make == "truncate":
        path.write_bytes(src.read_bytes()[:1000])
    elif make == "synth":
        path = src
    result = CliRunner().invoke(cli, ["estimate", str(path), *args])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output
