"""`homelab estimate FILE.gguf`: how much VRAM and RAM a model needs under llama.cpp.

The lead's `controller/cli.py` calls `register(app)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from controller.commands.common import out, printable
from solver.errors import EstimateError, GGUFError
from solver.estimate import (
    DEFAULT_GPU_OVERHEAD_BYTES,
    DEFAULT_N_SEQ,
    EstimateParams,
    MemoryBreakdown,
    estimate,
    estimate_all,
    llama_ngl,
    shape_from_header,
)
from solver.gguf import read_header
from specs.enums import KVCacheType, LayerOrder

MIB = 1 << 20


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f}"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {printable(message)}", err=True)
    return typer.Exit(1)


def _levels_table(name: str, rows: tuple[MemoryBreakdown, ...], params: EstimateParams) -> Table:
    table = Table(
        title=f"{name}: ctx {params.ctx}, KV {params.cache_type.value}, "
        f"flash attention {'on' if params.flash_attn else 'off'}, {params.layer_order.value}",
    )
    for col in ("ngl", "VRAM MiB", "RAM MiB", "weights GPU", "KV GPU", "compute GPU"):
        table.add_column(col, justify="right")
    for b in rows:
        table.add_row(
            str(b.gpu_layers),
            _mib(b.total_gpu),
            _mib(b.total_cpu),
            _mib(b.weights_gpu),
            _mib(b.kv_gpu),
            _mib(b.compute_gpu),
        )
    return table


def _breakdown_table(name: str, b: MemoryBreakdown, params: EstimateParams) -> Table:
    table = Table(
        title=f"{name}: ngl {b.gpu_layers}/{b.layers + 1}, ctx {params.ctx}, KV {params.cache_type.value}, "
        f"flash attention {'on' if params.flash_attn else 'off'}",
    )
    table.add_column("term")
    table.add_column("GPU MiB", justify="right")
    table.add_column("RAM MiB", justify="right")
    table.add_row("weights", _mib(b.weights_gpu), _mib(b.weights_cpu))
    table.add_row("repacked weights", "", _mib(b.repack_cpu))
    table.add_row("KV cache", _mib(b.kv_gpu), _mib(b.kv_cpu))
    table.add_row("compute buffer", _mib(b.compute_gpu), _mib(b.compute_cpu))
    table.add_row("output buffer", "", _mib(b.output_cpu))
    table.add_row("GPU overhead", _mib(b.overhead_gpu), "")
    table.add_row("total", _mib(b.total_gpu), _mib(b.total_cpu), style="bold")
    return table


def register(app: typer.Typer) -> None:
    """Add the `estimate` command to `app`."""

    @app.command("estimate")
    def estimate_cmd(
        file: Annotated[Path, typer.Argument(help="GGUF model file.", show_default=False)],
        ctx: Annotated[int, typer.Option("--ctx", help="Context length (tokens).")] = 4096,
        ngl: Annotated[
            int | None,
            typer.Option(
                "--ngl",
                help="GPU layers, 0 … L+1 as llama.cpp counts (-1, 99, 999: all). Default: a table of all levels.",
            ),
        ] = None,
        cache_type: Annotated[KVCacheType, typer.Option("--cache-type", help="KV cache type.")] = KVCacheType.F16,
        flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", help="Flash attention.")] = True,
        layer_order: Annotated[
            LayerOrder, typer.Option("--layer-order", help="How the node's llama.cpp build offloads layers.")
        ] = LayerOrder.OUTPUT_FIRST,
        gpu_overhead_mib: Annotated[
            int, typer.Option("--gpu-overhead-mib", help="Fixed per-GPU overhead (CUDA context etc.).")
        ] = DEFAULT_GPU_OVERHEAD_BYTES // MIB,
        parallel: Annotated[int, typer.Option("--parallel", help="llama-server slots (-np).")] = DEFAULT_N_SEQ,
        cpu: Annotated[bool, typer.Option("--cpu", help="A node without a GPU (ngl 0, no GPU terms).")] = False,
        as_json: Annotated[
            bool, typer.Option("--json", help="One JSON object of byte counts (ngl defaults to L+1, or 0 with --cpu).")
        ] = False,
    ) -> None:
        """Estimate the VRAM and RAM a GGUF model needs under llama.cpp."""
        params = EstimateParams(
            ctx=ctx,
            cache_type=cache_type,
            flash_attn=flash_attn,
            layer_order=layer_order,
            gpu_overhead=gpu_overhead_mib * MIB,
            n_seq=parallel,
            gpu=not cpu,
        )
        try:
            params.check()
            shape = shape_from_header(read_header(file))
            if as_json or ngl is not None:
                level = llama_ngl(ngl, shape.n_layer) if ngl is not None else (0 if cpu else shape.n_layer + 1)
                b = estimate(shape, level, params)
            else:
                rows = estimate_all(shape, params)
        except (GGUFError, EstimateError) as exc:
            raise _fail(str(exc)) from None

        if as_json:
            typer.echo(json.dumps(b.to_json()))
            return
        name = printable(shape.name)  # the file's own metadata: no markup, no control characters
        if ngl is not None:
            out.print(_breakdown_table(name, b, params))
        else:
            out.print(_levels_table(name, rows, params))
