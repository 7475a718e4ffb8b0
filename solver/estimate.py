"""How much memory a model needs under llama.cpp, per device, for a given offload level.

The input is a `ModelShape`: the facts about a model that memory depends on,
taken from a GGUF header (`shape_from_header`, exact tensor sizes), from
Ollama's `/api/show` `model_info` (`shape_from_model_info`, tensor sizes
estimated from shapes and the quantization), or skipped entirely when a spec
declares its memory (`MemoryBreakdown.declared`).

`estimate()` follows what llama.cpp allocates (see
shared/reference/llama-cpp-memory.md, and the measurements in
bench/estimate_accuracy.py):

- weights: the real bytes of each block's tensors; `token_embd` always on the
  CPU; the output layer (`output`, `output_norm`; a GPU copy of `token_embd` when
  the output is tied to it) placed by the node's `LayerOrder`;
- KV cache: per layer, cells x (H_kv(il)·d_k + H_kv(il)·d_v) at the cache type's
  size, with sliding-window layers holding only pad256(n_swa·n_seq + n_ubatch)
  cells; on the device of its layer;
- compute buffers: the ggml-alloc peak of the prompt-processing graph of
  T = min(n_ctx, n_ubatch) tokens (a fit of llama.cpp's CPU figures, see
  `_graph_bytes`); on partial offload the GPU buffer also holds a copy of the
  largest CPU-resident weight matrix;
- host buffers: the logits output buffer (n_seq x n_vocab f32) and, with no GPU
  in use, the CPU backend's extra weight buffers for the node's `CpuKind` (AMX,
  CPU_REPACK; see `solver.cpu`), with `CPU_Mapped` then the file span of the
  weights left in place;
- a fixed per-GPU overhead (CUDA context, cuBLAS, pool), configurable per node.

`estimate_split()` is the same model split by layers over several GPUs of one
node (`--split-mode layer`, full offload): llama.cpp's contiguous layer
assignment for a `--tensor-split` (`layer_devices`), and per device its blocks'
weights and KV, the output layer on the last device, its own compute buffer and
the per-GPU overhead. `split_curve()` is its form for the solver.

Everything here is pure arithmetic on the shape; the only I/O in the solver is
`solver.gguf.read_header`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from solver.cpu import CpuKind, CpuWeights, Weight, cpu_weights_by_kind
from solver.errors import EstimateError, GGUFError
from solver.gguf import ArrayInfo, GGUFHeader, MetaValue, TensorInfo, tensor_nbytes
from specs.enums import KVCacheType, LayerOrder
from specs.model import MAX_LAYERS

MIB = 1 << 20
DEFAULT_GPU_OVERHEAD_BYTES = 768 * MIB
"""What a CUDA llama.cpp process holds on its GPU beyond its buffers, while serving. Measured on an
H100 (CUDA 13, tests/data/gpu-memory/h100-cuda-probe.json): 518 MiB of context before the model,
528-534 MiB once loaded, ~598 after the first decode (cuBLAS), 606-730 after a 2048-token prompt
(the CUDA memory pool). A Vulkan build holds 49-57 MiB (h100-vulkan.json): set the node's
`gpu_overhead`."""
DEFAULT_N_UBATCH = 512
DEFAULT_N_SEQ = 4
"""llama-server's `-np` auto: 4 slots sharing one unified KV cache."""
KV_CELL_PAD = 256

_KV_TYPE: dict[KVCacheType, GGMLQuantizationType] = {
    KVCacheType.F16: GGMLQuantizationType.F16,
    KVCacheType.Q8_0: GGMLQuantizationType.Q8_0,
    KVCacheType.Q4_0: GGMLQuantizationType.Q4_0,
}
_NOT_MATMUL = ("token_embd.", "pos_embd.", "token_types.", "per_layer_token_embd.")
"""Matrices read with get_rows, not multiplied: never in an extra CPU buffer."""

# Interleaved sliding-window attention: layer il is SWA iff il % n < n - 1 (LC set_swa_pattern).
_SWA_PATTERN: dict[str, int] = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "gpt-oss": 2}
_SWA_DEFAULT_WINDOW: dict[str, int] = {"gemma2": 4096}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


# --------------------------------------------------------------------------- shape


@dataclass(frozen=True)
class LayerShape:
    """One repeating block: its weights and its attention geometry."""

    weights: int
    """Sum of the real sizes of the block's tensors (`blk.i.*`)."""
    n_head: int
    n_head_kv: int
    swa: bool = False
    largest_matrix: int = 0
    """Largest single matmul weight of the block (copied to the GPU when the block is on the CPU)."""


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, independent of context and offload."""

    name: str
    arch: str
    n_embd: int
    n_vocab: int
    n_ff: int
    head_dim_k: int
    head_dim_v: int
    layers: tuple[LayerShape, ...]
    input_weights: int
    """`token_embd` and any other non-block, non-output tensor: always on the CPU."""
    output_weights: int
    """`output` + `output_norm`; with a tied output, the GPU copy of `token_embd` is included."""
    output_tied: bool = False
    output_tied_copy: int = 0
    """The part of `output_weights` that is a GPU copy of `token_embd` (tied output)."""
    output_largest_matrix: int = 0
    n_swa: int = 0
    n_ctx_train: int = 0
    exact: bool = True
    """True when the weights are the sums of real tensor sizes (a GGUF header)."""
    cpu: Mapping[CpuKind, CpuWeights] = field(default_factory=dict, compare=False)
    """The weights on each kind of CPU with no GPU in use (`solver.cpu.cpu_weights_by_kind`)."""

    def cpu_weights(self, kind: CpuKind) -> CpuWeights:
        """The CPU buffers of the weights on a `kind` CPU with no GPU in use (all mapped when unknown)."""
        found = self.cpu.get(kind)
        if found is not None:
            return found
        mapped = self.input_weights + sum(lay.weights for lay in self.layers)
        return CpuWeights(mapped + self.output_weights - self.output_tied_copy)

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def weights_total(self) -> int:
        """Bytes of all weights when everything sits in one place (the GGUF tensor data)."""
        return (
            self.input_weights + sum(lay.weights for lay in self.layers) + self.output_weights - self.output_tied_copy
        )


def _meta(md: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = md.get(key, default)
    return default if value is None else value


# Sane bounds on what a header may claim, well above every published model (llama.cpp's own limits
# where it has them): a header beyond them is corrupt or hostile, and would otherwise make the
# estimate allocate per layer (MemoryError), loop for minutes, or overflow the solver's integers.
_LIMITS: dict[str, int] = {
    "block_count": MAX_LAYERS,  # LLAMA_MAX_LAYERS
    "embedding_length": 1 << 17,
    "attention.head_count": 1 << 12,
    "attention.head_count_kv": 1 << 12,
    "attention.key_length": 1 << 14,
    "attention.value_length": 1 << 14,
    "feed_forward_length": 1 << 20,
    "expert_feed_forward_length": 1 << 20,
    "expert_count": 1 << 12,
    "expert_used_count": 1 << 12,
    "vocab_size": 1 << 24,
    "context_length": 1 << 32,
    "attention.sliding_window": 1 << 32,
    "attention.sliding_window_pattern": MAX_LAYERS + 1,
}


def _shown(value: Any) -> str:
    """A header value in an error message: repr (control characters escaped), at most 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(value: Any, key: str, source: str, lo: int = 0) -> int:
    """A count from the metadata: a whole number within its bound, else one GGUFError naming the key."""
    hi = _LIMITS.get(key.split(".", 1)[1] if "." in key else key, 1 << 40)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise GGUFError(f"{source}: {key} must be a whole number, got {_shown(value)}")
    if not lo <= value <= hi:
        raise GGUFError(f"{source}: {key} is {value}, outside {lo} … {hi}; corrupt header")
    return value


def _per_layer(value: Any, n_layer: int, key: str, source: str) -> tuple[int, ...]:
    what = key.rsplit(".", 1)[-1]
    if isinstance(value, ArrayInfo):
        raise GGUFError(f"{source}: {what} array of {value.length} is too long to read")
    if isinstance(value, (list, tuple)):
        if len(value) != n_layer:
            raise GGUFError(f"{source}: {what} has {len(value)} entries for {n_layer} layers")
        return tuple(_whole(v, key, source) for v in value)
    return (_whole(value, key, source),) * n_layer


def _swa_flags(md: Mapping[str, Any], arch: str, n_layer: int, source: str) -> tuple[bool, ...]:
    key = f"{arch}.attention.sliding_window"
    window = _whole(_meta(md, key, _SWA_DEFAULT_WINDOW.get(arch, 0)), key, source)
    if window <= 0:
        return (False,) * n_layer
    pattern = md.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layer:
            raise GGUFError(f"{source}: sliding_window_pattern has {len(pattern)} entries for {n_layer} layers")
        return tuple(bool(p) for p in pattern)
    n = (
        _whole(pattern, f"{arch}.attention.sliding_window_pattern", source)
        if isinstance(pattern, int) and not isinstance(pattern, bool)
        else _SWA_PATTERN.get(arch, 0)
    )
    if n == 1:
        return (True,) * n_layer
    if n <= 0:
        # A window but no pattern llama.cpp is known to apply (e.g. a llama-arch Mistral, whose
        # window llama.cpp ignores): count every layer as full-size, an over- rather than an under-estimate.
        return (False,) * n_layer
    return tuple(il % n < n - 1 for il in range(n_layer))


@dataclass(frozen=True)
class _Geometry:
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ff: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    swa: tuple[bool, ...]
    n_swa: int
    n_ctx_train: int
    n_expert: int
    n_expert_used: int
    n_ff_expert: int


def _geometry(md: Mapping[str, Any], source: str, n_vocab_hint: int | None = None) -> _Geometry:
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{source}: no general.architecture in the model metadata")

    if len(arch) > 64:
        raise GGUFError(f"{source}: general.architecture {_shown(arch)} is not an architecture name")

    def need(key: str) -> Any:
        value = md.get(f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{source}: missing {arch}.{key} in the model metadata")
        return value

    def count(key: str, default: Any, lo: int = 0) -> int:
        return _whole(_meta(md, f"{arch}.{key}", default), f"{arch}.{key}", source, lo)

    n_layer = _whole(need("block_count"), f"{arch}.block_count", source, lo=1)
    n_embd = _whole(need("embedding_length"), f"{arch}.embedding_length", source, lo=1)
    n_head = _per_layer(need("attention.head_count"), n_layer, f"{arch}.attention.head_count", source)
    n_head_kv = _per_layer(
        _meta(md, f"{arch}.attention.head_count_kv", n_head), n_layer, f"{arch}.attention.head_count_kv", source
    )
    h0 = max(n_head) or 1
    d_k = count("attention.key_length", min(n_embd // h0, _LIMITS["attention.key_length"]))
    d_v = count("attention.value_length", min(n_embd // h0, _LIMITS["attention.value_length"]))
    ff = _meta(md, f"{arch}.feed_forward_length", min(4 * n_embd, _LIMITS["feed_forward_length"]))
    n_ff = max(_per_layer(ff, n_layer, f"{arch}.feed_forward_length", source))
    tokens = md.get("tokenizer.ggml.tokens")
    n_vocab = n_vocab_hint or count("vocab_size", 0) or (len(tokens) if isinstance(tokens, (tuple, ArrayInfo)) else 0)
    if n_vocab <= 0:
        raise GGUFError(f"{source}: cannot tell the vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")
    if n_vocab > _LIMITS["vocab_size"]:
        raise GGUFError(f"{source}: a vocabulary of {n_vocab} tokens, over {_LIMITS['vocab_size']}; corrupt header")
    n_swa = count("attention.sliding_window", _SWA_DEFAULT_WINDOW.get(arch, 0))
    return _Geometry(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=d_k,
        head_dim_v=d_v,
        swa=_swa_flags(md, arch, n_layer, source),
        n_swa=n_swa,
        n_ctx_train=count("context_length", 0),
        n_expert=count("expert_count", 0),
        n_expert_used=count("expert_used_count", 0),
        n_ff_expert=count("expert_feed_forward_length", 0),
    )


def _effective_ff(g: _Geometry) -> int:
    """FFN width that sets the compute buffer: the dense FFN, or the active experts."""
    if g.n_expert > 0 and g.n_expert_used > 0:
        return max(g.n_ff_expert or g.n_ff, 1) * g.n_expert_used
    return g.n_ff


def shape_from_header(header: GGUFHeader, name: str = "") -> ModelShape:
    """The shape of a model read from its GGUF header, with exact tensor sizes."""
    source = header.path or name or "model"
    md = header.metadata
    embd = header.tensor("token_embd.weight")
    n_vocab_hint = int(embd.shape[1]) if embd is not None and len(embd.shape) >= 2 else None
    g = _geometry(md, source, n_vocab_hint)

    blocks: list[list[TensorInfo]] = [[] for _ in range(g.n_layer)]
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []
    for t in header.tensors:
        m = _BLOCK_RE.match(t.name)
        if m:
            il = int(m.group(1)) if len(m.group(1)) <= 6 else g.n_layer
            if il >= g.n_layer:
                raise GGUFError(f"{source}: tensor {t.name} is beyond block_count {g.n_layer}")
            blocks[il].append(t)
        elif t.name.startswith("output"):
            outputs.append(t)
        else:
            inputs.append(t)

    def is_matrix(t: TensorInfo) -> bool:
        return len(t.shape) >= 2 and t.shape[1] > 1

    def weight(t: TensorInfo) -> Weight:
        matmul = is_matrix(t) and not t.name.startswith(_NOT_MATMUL) and "norm" not in t.name
        return Weight(t.ggml_type, t.shape, t.n_bytes, matmul, header.data_offset + t.offset)

    weights = [weight(t) for t in header.tensors]
    if embd is not None and header.tensor("output.weight") is None:
        # a tied output multiplies by token_embd: a matmul use of it, which an extra buffer may copy
        weights.append(Weight(embd.ggml_type, embd.shape, embd.n_bytes, True, None, mapped=False))

    layers = tuple(
        LayerShape(
            weights=sum(t.n_bytes for t in ts),
            n_head=g.n_head[il],
            n_head_kv=g.n_head_kv[il],
            swa=g.swa[il],
            largest_matrix=max((t.n_bytes for t in ts if is_matrix(t)), default=0),
        )
        for il, ts in enumerate(blocks)
    )
    tied = header.tensor("output.weight") is None
    tied_copy = embd.n_bytes if (tied and embd is not None) else 0
    out_matrix = max((t.n_bytes for t in outputs if is_matrix(t)), default=tied_copy)
    return ModelShape(
        name=name or str(md.get("general.name") or header.path),
        arch=g.arch,
        n_embd=g.n_embd,
        n_vocab=g.n_vocab,
        n_ff=_effective_ff(g),
        head_dim_k=g.head_dim_k,
        head_dim_v=g.head_dim_v,
        layers=layers,
        input_weights=sum(t.n_bytes for t in inputs),
        output_weights=sum(t.n_bytes for t in outputs) + tied_copy,
        output_tied=tied,
        output_tied_copy=tied_copy,
        output_largest_matrix=out_matrix,
        n_swa=g.n_swa,
        n_ctx_train=g.n_ctx_train,
        exact=True,
        cpu=cpu_weights_by_kind(weights),
    )


# Quantization (Ollama's `details.quantization_level` or general.file_type) -> tensor types:
# (most matrices, attn_v/ffn_down on "more bits" layers, output, token_embd).
_T = GGMLQuantizationType
_FILE_TYPES: dict[str, tuple[_T, _T, _T, _T]] = {
    "F32": (_T.F32, _T.F32, _T.F32, _T.F32),
    "F16": (_T.F16, _T.F16, _T.F16, _T.F16),
    "BF16": (_T.BF16, _T.BF16, _T.BF16, _T.BF16),
    "Q8_0": (_T.Q8_0, _T.Q8_0, _T.Q8_0, _T.Q8_0),
    "Q6_K": (_T.Q6_K, _T.Q6_K, _T.Q6_K, _T.Q6_K),
    "Q5_K_M": (_T.Q5_K, _T.Q6_K, _T.Q6_K, _T.Q5_K),
    "Q5_K_S": (_T.Q5_K, _T.Q5_K, _T.Q6_K, _T.Q5_K),
    "Q5_0": (_T.Q5_0, _T.Q5_0, _T.Q6_K, _T.Q5_0),
    "Q5_1": (_T.Q5_1, _T.Q5_1, _T.Q6_K, _T.Q5_1),
    "Q4_K_M": (_T.Q4_K, _T.Q6_K, _T.Q6_K, _T.Q4_K),
    "Q4_K_S": (_T.Q4_K, _T.Q5_K, _T.Q6_K, _T.Q4_K),
    "Q4_0": (_T.Q4_0, _T.Q4_0, _T.Q6_K, _T.Q4_0),
    "Q4_1": (_T.Q4_1, _T.Q4_1, _T.Q6_K, _T.Q4_1),
    "IQ4_XS": (_T.IQ4_XS, _T.IQ4_XS, _T.Q6_K, _T.IQ4_XS),
    "IQ4_NL": (_T.IQ4_NL, _T.IQ4_NL, _T.Q6_K, _T.IQ4_NL),
    "Q3_K_L": (_T.Q3_K, _T.Q5_K, _T.Q6_K, _T.Q3_K),
    "Q3_K_M": (_T.Q3_K, _T.Q4_K, _T.Q6_K, _T.Q3_K),
    "Q3_K_S": (_T.Q3_K, _T.Q3_K, _T.Q6_K, _T.Q3_K),
    "Q2_K": (_T.Q2_K, _T.Q3_K, _T.Q6_K, _T.Q2_K),
    "MXFP4": (_T.MXFP4, _T.MXFP4, _T.Q8_0, _T.Q8_0),
}
_FILE_TYPE_IDS: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    25: "IQ4_NL",
    30: "IQ4_XS",
    32: "BF16",
    38: "MXFP4",
}


def _matrix(qtype: _T, n_in: int, n_out: int, n_expert: int = 0) -> Weight:
    """An n_in x n_out matmul weight of `qtype` (x n_expert when given), falling back to Q8_0 or F16
    when rows don't fit its blocks, as llama-quantize does."""
    block, _ = GGML_QUANT_SIZES[qtype]
    if n_in % block:
        qtype = _T.Q8_0 if n_in % 32 == 0 else _T.F16
    shape = (n_in, n_out, n_expert) if n_expert else (n_in, n_out)
    return Weight(qtype, shape, tensor_nbytes(qtype, shape), matmul=True)


def shape_from_model_info(
    model_info: Mapping[str, Any],
    quantization: str | None = None,
    name: str = "",
) -> ModelShape:
    """The shape of a model from Ollama's `/api/show` (`model_info`, `details.quantization_level`).

    `model_info` has the GGUF metadata keys but no tensor infos: each tensor's
    size is computed from the shapes and the quantization (or `general.file_type`),
    following llama.cpp's quantization mix (more bits for attn_v/ffn_down on
    1/8 + every third layer, Q6_K output). Expect a few percent of error.
    """
    source = name or "model_info"
    md: Mapping[str, MetaValue | None] = model_info
    g = _geometry(md, source)
    if quantization is None:
        ft = md.get("general.file_type")
        quantization = _FILE_TYPE_IDS.get(int(ft), "") if isinstance(ft, int) else ""
    key = quantization.upper().replace("-", "_")
    if key not in _FILE_TYPES:
        raise GGUFError(f"{source}: unknown quantization {quantization or '(none)'}; use one of {sorted(_FILE_TYPES)}")
    base, more_bits, out_t, embd_t = _FILE_TYPES[key]
    e, n_layer = g.n_embd, g.n_layer
    layers: list[LayerShape] = []
    weights: list[Weight] = []
    for il in range(n_layer):
        use_more = il < n_layer // 8 or il >= 7 * n_layer // 8 or (il - n_layer // 8) % 3 == 2
        vt = more_bits if use_more else base
        q = g.n_head[il] * g.head_dim_k
        kv_k = g.n_head_kv[il] * g.head_dim_k
        kv_v = g.n_head_kv[il] * g.head_dim_v
        block = [
            _matrix(base, e, q),
            _matrix(base, e, kv_k),
            _matrix(vt, e, kv_v),
            _matrix(base, g.n_head[il] * g.head_dim_v, e),
        ]
        if g.n_expert > 0:
            ff = g.n_ff_expert or g.n_ff
            block += [
                _matrix(base, e, ff, g.n_expert),
                _matrix(base, e, ff, g.n_expert),
                _matrix(vt, ff, e, g.n_expert),
                _matrix(_T.F32, e, g.n_expert),
            ]
        else:
            block += [_matrix(base, e, g.n_ff), _matrix(base, e, g.n_ff), _matrix(vt, g.n_ff, e)]
        norms = Weight(_T.F32, (e, 2), 2 * e * 4, matmul=False)
        weights += [*block, norms]
        mats = [w.n_bytes for w in block]
        layers.append(
            LayerShape(
                weights=sum(mats) + norms.n_bytes,
                n_head=g.n_head[il],
                n_head_kv=g.n_head_kv[il],
                swa=g.swa[il],
                largest_matrix=max(mats),
            )
        )
    embd_w = _matrix(embd_t, e, g.n_vocab)
    out_w = _matrix(out_t, e, g.n_vocab)
    embd, out = embd_w.n_bytes, out_w.n_bytes
    weights += [Weight(embd_w.ggml_type, embd_w.shape, embd, matmul=False), out_w]
    weights.append(Weight(_T.F32, (e,), e * 4, matmul=False))
    return ModelShape(
        name=name or str(md.get("general.name") or "model"),
        arch=g.arch,
        n_embd=e,
        n_vocab=g.n_vocab,
        n_ff=_effective_ff(g),
        head_dim_k=g.head_dim_k,
        head_dim_v=g.head_dim_v,
        layers=tuple(layers),
        input_weights=embd,
        output_weights=out + e * 4,
        output_largest_matrix=out,
        n_swa=g.n_swa,
        n_ctx_train=g.n_ctx_train,
        exact=False,
        cpu=cpu_weights_by_kind(weights),
    )


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes a model needs on its GPU and in host RAM at one offload level."""

    layers: int
    """L, the number of repeating blocks (ngl runs from 0 to L+1)."""
    gpu_layers: int
    """ngl, counted as llama.cpp counts it (the output layer is one of them)."""
    weights_gpu: int = 0
    weights_cpu: int = 0
    kv_gpu: int = 0
    kv_cpu: int = 0
    compute_gpu: int = 0
    compute_cpu: int = 0
    overhead_gpu: int = 0
    output_cpu: int = 0
    """Host logits buffer (n_seq x n_vocab f32)."""
    repack_cpu: int = 0
    """The CPU backend's extra, repacked copies of weights (AMX, CPU_REPACK buffers; no GPU in use)."""
    declared: bool = False

    @property
    def total_gpu(self) -> int:
        return self.weights_gpu + self.kv_gpu + self.compute_gpu + self.overhead_gpu

    @property
    def total_cpu(self) -> int:
        return self.weights_cpu + self.kv_cpu + self.compute_cpu + self.output_cpu + self.repack_cpu

    @classmethod
    def from_declared(cls, vram_bytes: int, ram_bytes: int) -> MemoryBreakdown:
        """A breakdown for a model whose spec declares its memory instead of a GGUF.

        The declared VRAM is taken as all of the model's GPU need (weights term), the
        declared RAM as its host need; there are no layers to split.
        """
        if vram_bytes < 0 or ram_bytes < 0:
            raise EstimateError("declared memory must not be negative")
        return cls(
            layers=0,
            gpu_layers=0,
            weights_gpu=vram_bytes,
            weights_cpu=ram_bytes,
            declared=True,
        )

    def to_json(self) -> dict[str, int]:
        """The integer byte fields of `homelab estimate --json`."""
        return {
            "layers": self.layers,
            "gpu_layers": self.gpu_layers,
            "weights_gpu": self.weights_gpu,
            "weights_cpu": self.weights_cpu,
            "kv_gpu": self.kv_gpu,
            "kv_cpu": self.kv_cpu,
            "compute_gpu": self.compute_gpu,
            "compute_cpu": self.compute_cpu,
            "overhead_gpu": self.overhead_gpu,
            "output_cpu": self.output_cpu,
            "repack_cpu": self.repack_cpu,
            "total_gpu": self.total_gpu,
            "total_cpu": self.total_cpu,
        }


@dataclass(frozen=True)
class EstimateParams:
    """Everything besides the model and ngl that memory depends on."""

    ctx: int
    cache_type: KVCacheType = KVCacheType.F16
    flash_attn: bool = True
    layer_order: LayerOrder = LayerOrder.OUTPUT_FIRST
    gpu_overhead: int = DEFAULT_GPU_OVERHEAD_BYTES
    n_seq: int = DEFAULT_N_SEQ
    n_ubatch: int = DEFAULT_N_UBATCH
    gpu: bool = True
    """False for a node without a GPU: ngl must be 0 and there are no GPU terms."""
    cpu: CpuKind = CpuKind.UNKNOWN
    """The node's CPU, for the extra weight buffers of the CPU backend (used only with `gpu=False`);
    UNKNOWN takes the kind that needs the most RAM for the model."""

    def check(self) -> None:
        if self.ctx <= 0:
            raise EstimateError(f"context length must be positive, got {self.ctx}")
        if self.n_seq <= 0 or self.n_ubatch <= 0:
            raise EstimateError("n_seq and n_ubatch must be positive")
        if self.gpu_overhead < 0:
            raise EstimateError(f"GPU overhead must not be negative, got {self.gpu_overhead}")
        if self.cache_type != KVCacheType.F16 and not self.flash_attn:
            raise EstimateError(f"a {self.cache_type.value} KV cache needs flash attention (llama.cpp refuses it)")


# --------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class _Placement:
    gpu_blocks: frozenset[int]
    output_on_gpu: bool


def _placement(n_layer: int, ngl: int, order: LayerOrder) -> _Placement:
    if order == LayerOrder.OUTPUT_FIRST:
        output = ngl >= 1
        n_blocks = min(max(ngl - 1, 0), n_layer) if ngl <= n_layer else n_layer
    else:
        output = ngl >= n_layer + 1
        n_blocks = min(ngl, n_layer)
    return _Placement(frozenset(range(n_layer - n_blocks, n_layer)), output)


def kv_cells(shape: ModelShape, params: EstimateParams) -> tuple[int, int]:
    """(cells of a full-attention layer, cells of a sliding-window layer) for a unified cache."""
    n_ctx = _pad(params.ctx, KV_CELL_PAD)
    swa_cells = n_ctx
    if shape.n_swa > 0:
        swa_cells = min(n_ctx, _pad(shape.n_swa * params.n_seq + params.n_ubatch, KV_CELL_PAD))
    return n_ctx, swa_cells


def kv_layer_bytes(shape: ModelShape, params: EstimateParams) -> tuple[int, ...]:
    """KV cache bytes of each layer."""
    qtype = _KV_TYPE[params.cache_type]
    dense, swa = kv_cells(shape, params)
    out = []
    for lay in shape.layers:
        cells = swa if lay.swa else dense
        k = tensor_nbytes(qtype, (lay.n_head_kv * shape.head_dim_k, cells)) if lay.n_head_kv else 0
        v = tensor_nbytes(qtype, (lay.n_head_kv * shape.head_dim_v, cells)) if lay.n_head_kv else 0
        out.append(k + v)
    return tuple(out)


def ubatch_tokens(params: EstimateParams) -> int:
    """T: the tokens of the largest batch llama.cpp reserves its compute graph for."""
    return min(_pad(params.ctx, KV_CELL_PAD), params.n_ubatch)


def _graph_bytes(shape: ModelShape, params: EstimateParams) -> tuple[int, int]:
    """(whole compute graph, its inputs) for one backend, in bytes.

    The peak of ggml-alloc over the prompt-processing graph of T tokens, fitted to
    llama.cpp's own CPU figures for llama and gemma3 (bench/estimate_accuracy.py):
    the KQ masks (f16 with flash attention, f32 without) stay live throughout, and
    on top of them the largest of three phases, in f32 elements per token:
      FFN:       3·n_ff + 4·E
      attention: 3·E + 2·q (+ 2·kv + H·n_kv without flash attention: KQ is materialised)
      output:    E, plus n_seq rows of logits (4·n_seq·V bytes)
    """
    t = ubatch_tokens(params)
    dense, swa = kv_cells(shape, params)
    has_swa = any(lay.swa for lay in shape.layers)
    has_dense = any(not lay.swa for lay in shape.layers)
    mask_elt = 2 if params.flash_attn else 4
    masks = t * mask_elt * ((dense if has_dense else 0) + (swa if has_swa else 0))
    e = shape.n_embd
    n_head = max((lay.n_head for lay in shape.layers), default=1)
    q = n_head * shape.head_dim_k
    kv = max((lay.n_head_kv for lay in shape.layers), default=0) * shape.head_dim_k
    n_kv = dense if has_dense else swa
    ffn = 3 * shape.n_ff + 4 * e
    attn = 3 * e + 2 * q
    if not params.flash_attn:
        attn += 2 * kv + n_head * n_kv
    phase = max(4 * t * ffn, 4 * t * attn, 4 * t * e + 4 * params.n_seq * shape.n_vocab)
    inputs = 4 * t * e + masks
    return masks + phase, inputs


def llama_ngl(ngl: int, n_layer: int) -> int:
    """`-ngl` as llama.cpp reads it: -1, or anything above L+1 (users write 99 or 999), is every layer."""
    if ngl == -1 or ngl > n_layer + 1:
        return n_layer + 1
    if ngl < 0:
        raise EstimateError(f"ngl must be between 0 and {n_layer + 1} (L+1), or -1 for all layers; got {ngl}")
    return ngl


def estimate(shape: ModelShape, ngl: int, params: EstimateParams) -> MemoryBreakdown:
    """Memory of `shape` with `ngl` layers offloaded (0 … L+1, as llama.cpp counts)."""
    params.check()
    n_layer = shape.n_layer
    if not 0 <= ngl <= n_layer + 1:
        raise EstimateError(f"ngl must be between 0 and {n_layer + 1} (L+1) for {shape.name}, got {ngl}")
    if not params.gpu and ngl != 0:
        raise EstimateError(f"ngl must be 0 on a node without a GPU, got {ngl}")

    place = _placement(n_layer, ngl, params.layer_order)
    kv = kv_layer_bytes(shape, params)
    w_gpu = sum(shape.layers[i].weights for i in place.gpu_blocks)
    kv_gpu = sum(kv[i] for i in place.gpu_blocks)
    w_cpu = shape.input_weights + sum(lay.weights for i, lay in enumerate(shape.layers) if i not in place.gpu_blocks)
    repack = 0
    if place.output_on_gpu:
        w_gpu += shape.output_weights
    else:
        w_cpu += shape.output_weights - shape.output_tied_copy
    if not params.gpu:
        # No GPU in use: the CPU backend's extra buffers take the weights they have kernels for.
        cw = shape.cpu_weights(params.cpu)
        w_cpu, repack = cw.mapped, cw.extra_total
    kv_cpu = sum(kv) - kv_gpu

    graph, inputs = _graph_bytes(shape, params)
    full = len(place.gpu_blocks) == n_layer and place.output_on_gpu
    # With a GPU, the host compute buffer holds the graph inputs and the embeddings that
    # get_rows reads from the CPU-resident token_embd (one T x E f32 tensor), at every
    # offload level: the large-batch ops of CPU layers run on the GPU too (measured with a
    # real llama-server on an H100, bench/gpu_memory.py).
    embd = 4 * ubatch_tokens(params) * shape.n_embd
    if not params.gpu:
        compute_gpu, compute_cpu, overhead = 0, graph, 0
    elif full:
        # The embeddings arrive from the host, so the GPU graph lacks the first two T x E
        # tensors of the CPU graph (measured: reported = graph - 2·T·E·4 on every shape).
        compute_gpu, compute_cpu, overhead = graph - 2 * embd, inputs + embd, params.gpu_overhead
    else:
        # Large-batch matmuls of CPU-resident weights run on the GPU, which copies the
        # weight into its compute buffer: room for the largest such matrix. The output
        # matmul only sees n_seq rows (below the batch-32 threshold), so it stays on the CPU.
        cpu_mats = [lay.largest_matrix for i, lay in enumerate(shape.layers) if i not in place.gpu_blocks]
        compute_gpu, compute_cpu = graph + max(cpu_mats, default=0), inputs + embd
        overhead = params.gpu_overhead

    return MemoryBreakdown(
        layers=n_layer,
        gpu_layers=ngl,
        weights_gpu=w_gpu,
        weights_cpu=w_cpu,
        kv_gpu=kv_gpu,
        kv_cpu=kv_cpu,
        compute_gpu=compute_gpu,
        compute_cpu=compute_cpu,
        overhead_gpu=overhead,
        output_cpu=4 * params.n_seq * shape.n_vocab,
        repack_cpu=repack,
    )


def estimate_all(shape: ModelShape, params: EstimateParams) -> tuple[MemoryBreakdown, ...]:
    """`estimate` for every offload level 0 … L+1 (only 0 without a GPU)."""
    top = shape.n_layer + 1 if params.gpu else 0
    return tuple(estimate(shape, ngl, params) for ngl in range(top + 1))


def max_gpu_layers(shape: ModelShape, free_vram: int, params: EstimateParams) -> int | None:
    """The most layers (ngl) whose VRAM fits in `free_vram`, or None if not even ngl=0 fits.

    VRAM is not monotonic in ngl (the partial-offload compute buffer holds a copy of
    a CPU weight that full offload does not need), so every level is checked.
    """
    best: int | None = None
    for b in estimate_all(shape, params):
        if b.total_gpu <= free_vram:
            best = b.gpu_layers
    return best


@dataclass(frozen=True)
class LayerCurve:
    """VRAM and RAM as linear functions of the blocks offloaded, for the placement solver.

    With k = blocks on the GPU (`blocks(ngl)`), for the three regimes (no GPU layer,
    partial offload, full offload):

        VRAM(ngl) = gpu_fixed[regime] + sum(gpu_per_block[:k])
        RAM(ngl)  = cpu_fixed[regime] - sum(cpu_per_block[:k])

    `gpu_per_block[j]` is the weights + KV of the j-th block to move (the last block
    first), exact per block. The fixed parts hold the overhead, the compute buffers,
    the output layer and the input embedding; the partial regime takes the largest
    value over its ngl range, so the curve is exact when blocks are alike and an upper
    bound otherwise.
    """

    layers: int
    layer_order: LayerOrder
    gpu_per_block: tuple[int, ...]
    cpu_per_block: tuple[int, ...]
    gpu_fixed: tuple[int, int, int]
    """(ngl = 0, 1 ≤ ngl ≤ L, ngl = L+1)."""
    cpu_fixed: tuple[int, int, int]

    def blocks(self, ngl: int) -> int:
        if self.layer_order == LayerOrder.OUTPUT_FIRST:
            return 0 if ngl == 0 else min(ngl - 1, self.layers) if ngl <= self.layers else self.layers
        return min(ngl, self.layers)

    def regime(self, ngl: int) -> int:
        return 0 if ngl == 0 else 2 if ngl >= self.layers + 1 else 1

    def vram(self, ngl: int) -> int:
        return self.gpu_fixed[self.regime(ngl)] + sum(self.gpu_per_block[: self.blocks(ngl)])

    def ram(self, ngl: int) -> int:
        return self.cpu_fixed[self.regime(ngl)] - sum(self.cpu_per_block[: self.blocks(ngl)])


def layer_curve(shape: ModelShape, params: EstimateParams) -> LayerCurve:
    """The linear VRAM/RAM model of `shape` for the solver (see `LayerCurve`)."""
    if not params.gpu:
        raise EstimateError("a layer curve needs a GPU node")
    n = shape.n_layer
    kv = kv_layer_bytes(shape, params)
    order = list(range(n - 1, -1, -1))
    gpu_per = tuple(shape.layers[i].weights + kv[i] for i in order)
    cpu_per = tuple(shape.layers[i].weights + kv[i] for i in order)
    curve = LayerCurve(n, params.layer_order, gpu_per, cpu_per, (0, 0, 0), (0, 0, 0))
    gpu_fixed = [0, 0, 0]
    cpu_fixed = [0, 0, 0]
    for b in estimate_all(shape, params):
        r = curve.regime(b.gpu_layers)
        k = curve.blocks(b.gpu_layers)
        gpu_fixed[r] = max(gpu_fixed[r], b.total_gpu - sum(gpu_per[:k]))
        cpu_fixed[r] = max(cpu_fixed[r], b.total_cpu + sum(cpu_per[:k]))
    # ngl = 0 is a replica started without GPU access: the whole CPU graph, and the extra
    # weight buffers of the node's CPU (with a GPU in use the host buffer takes the weights).
    cpu_fixed[0] = estimate(shape, 0, replace(params, gpu=False)).total_cpu
    return replace(
        curve,
        gpu_fixed=(gpu_fixed[0], gpu_fixed[1], gpu_fixed[2]),
        cpu_fixed=(cpu_fixed[0], cpu_fixed[1], cpu_fixed[2]),
    )


# --------------------------------------------------------------------------- multi-GPU split

SPLIT_PIPELINE_COPIES = 4
"""GGML_SCHED_MAX_COPIES: with several GPUs and full offload llama.cpp enables pipeline parallelism and
keeps this many copies of each device's graph inputs (reference page, section 4; unmeasured here)."""


def layer_devices(n_layer: int, ngl: int, tensor_split: Sequence[float]) -> tuple[int, ...]:
    """The device of each layer il = 0 … L (L is the output layer) under `--split-mode layer`; -1 is the CPU.

    llama.cpp's `load_tensors` (the source quoted in shared/reference/llama-cpp-memory.md section 2, and
    llama.cpp's `get_layer_buft_list`): the split proportions are normalised into cumulative split points
    `splits[j]` (float32), `i_gpu_start = max(L - ngl, 0)`, `act = min(ngl, L + 1)`, and layer il, when
    `i_gpu_start ≤ il < i_gpu_start + act`, goes to the first device j with `splits[j] > (il - i_gpu_start) / act`
    (`std::upper_bound`). So devices get contiguous blocks of layers in proportion to the split, and the
    output layer (il = L) goes to the last device with a non-zero share. This is the older (`output-last`)
    offload rule; for full offload (ngl ≥ L + 1) both rules put every layer on a GPU, and which device a
    recent build gives the output layer has not been measured here (no GPU).
    """
    if n_layer <= 0:
        raise EstimateError("a split needs at least one layer")
    if not tensor_split or any(x < 0 for x in tensor_split) or sum(tensor_split) <= 0:
        raise EstimateError(f"tensor split must be non-negative proportions, not all 0: {list(tensor_split)}")
    f32 = np.float32
    cum: list[np.float32] = []
    total = f32(0.0)
    for x in tensor_split:
        total = f32(total + f32(x))
        cum.append(total)
    points = [f32(c / total) for c in cum]
    start = max(n_layer - ngl, 0)
    act = min(ngl, n_layer + 1)
    out: list[int] = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(-1)
            continue
        value = f32(f32(il - start) / f32(act))
        out.append(min(bisect.bisect_right(points, value), len(points) - 1))
    return tuple(out)


def split_layers(n_layer: int, tensor_split: Sequence[float]) -> tuple[int, ...]:
    """Layers (blocks, and the output layer on its device) each device holds at full offload."""
    counts = [0] * len(tensor_split)
    for dev in layer_devices(n_layer, n_layer + 1, tensor_split):
        counts[dev] += 1
    return tuple(counts)


def tensor_split_for(blocks: Sequence[int]) -> tuple[int, ...]:
    """The `--tensor-split` that makes llama.cpp give device j exactly `blocks[j]` blocks at full offload.

    The proportions are layer counts, the output layer counted on the last device: with integer
    proportions the split points are n/(L+1) and layer il/(L+1) exactly, so `layer_devices` reproduces
    the counts (no rounding between bytes and layers).
    """
    if len(blocks) < 1 or any(b < 0 for b in blocks):
        raise EstimateError(f"blocks per device must be non-negative: {list(blocks)}")
    return (*blocks[:-1], blocks[-1] + 1)


@dataclass(frozen=True)
class SplitEstimate:
    """Memory of a model split by layers over several GPUs of one node, fully offloaded."""

    layers: tuple[int, ...]
    """Layers per device as llama.cpp assigns them (blocks, plus the output layer on its device)."""
    devices: tuple[MemoryBreakdown, ...]
    """Per device: its blocks' weights and KV, the output layer on its device, a compute buffer and the
    fixed overhead on every device that holds a layer; a device with none holds nothing."""
    ram_bytes: int
    """Host RAM: as for full offload on one GPU (token_embd, host compute and output buffers)."""

    @property
    def vram(self) -> tuple[int, ...]:
        return tuple(d.total_gpu for d in self.devices)


def _split_device_compute(shape: ModelShape, params: EstimateParams) -> int:
    graph, inputs = _graph_bytes(shape, params)
    return graph + (SPLIT_PIPELINE_COPIES - 1) * inputs


def estimate_split(shape: ModelShape, params: EstimateParams, tensor_split: Sequence[float]) -> SplitEstimate:
    """Per-GPU memory of `shape` fully offloaded (ngl = L+1) over len(tensor_split) GPUs, `--split-mode layer`.

    Which layers go where is `layer_devices` (llama.cpp's source). Per device in use:
    - weights and KV of its blocks (KV follows its layer: reference page section 3);
    - the output layer on the device that gets layer L;
    - its own compute buffer: charged the whole single-GPU full-offload graph (an upper bound: the
      logits phase is only on the last device), plus (SPLIT_PIPELINE_COPIES − 1) more copies of the
      graph inputs for pipeline parallelism. The reference page says compute buffers grow "roughly ×4"
      with pipeline parallelism; published multi-GPU logs (equal per-device buffers near one
      single-GPU graph) and ggml-backend's copying only split inputs suggest otherwise. Unmeasured here;
    - the per-GPU fixed overhead (CUDA context, cuBLAS) on every device used (section 5).
    Full offload only: a split with CPU layers is not modelled. No GPU was available to check any
    of this against a real multi-GPU llama-server.
    """
    params.check()
    if not params.gpu:
        raise EstimateError("a split needs GPUs")
    n = shape.n_layer
    devs = layer_devices(n, n + 1, tensor_split)
    kv = kv_layer_bytes(shape, params)
    compute = _split_device_compute(shape, params)
    out: list[MemoryBreakdown] = []
    counts: list[int] = []
    for j in range(len(tensor_split)):
        blocks = [il for il in range(n) if devs[il] == j]
        has_output = devs[n] == j
        counts.append(len(blocks) + int(has_output))
        used = bool(blocks) or has_output
        out.append(
            MemoryBreakdown(
                layers=n,
                gpu_layers=len(blocks) + int(has_output),
                weights_gpu=sum(shape.layers[i].weights for i in blocks) + (shape.output_weights if has_output else 0),
                kv_gpu=sum(kv[i] for i in blocks),
                compute_gpu=compute if used else 0,
                overhead_gpu=params.gpu_overhead if used else 0,
            )
        )
    host = estimate(shape, n + 1, params).total_cpu
    return SplitEstimate(tuple(counts), tuple(out), host)


@dataclass(frozen=True)
class SplitCurve:
    """A model's per-GPU memory when split at full offload, as the solver counts it.

    Device j of a split holding blocks [a, b) needs `device_fixed` + Σ block_bytes[a:b], and the last
    device also `output_bytes`. Exact for `estimate_split` (see `devices`), for GGUF-derived curves.
    """

    block_bytes: tuple[int, ...]
    """Weights + KV of each block, in llama.cpp's order (block 0 first, on the first device)."""
    output_bytes: int
    device_fixed: int
    """Overhead + compute buffer on every device the split uses."""
    ram_bytes: int

    @property
    def layers(self) -> int:
        return len(self.block_bytes)

    def devices(self, blocks: Sequence[int]) -> tuple[int, ...]:
        """VRAM per device with `blocks[j]` consecutive blocks on device j and the output on the last."""
        if sum(blocks) != self.layers or any(b < 0 for b in blocks) or not blocks:
            raise EstimateError(f"blocks per device {list(blocks)} do not add up to {self.layers}")
        out: list[int] = []
        start = 0
        for j, b in enumerate(blocks):
            last = j == len(blocks) - 1
            used = b > 0 or last
            body = sum(self.block_bytes[start : start + b]) + (self.output_bytes if last else 0)
            out.append(body + (self.device_fixed if used else 0))
            start += b
        return tuple(out)


def split_curve(shape: ModelShape, params: EstimateParams) -> SplitCurve:
    """The `SplitCurve` of `shape` (see `estimate_split` for what each term is and what is unmeasured)."""
    params.check()
    kv = kv_layer_bytes(shape, params)
    return SplitCurve(
        block_bytes=tuple(lay.weights + kv[i] for i, lay in enumerate(shape.layers)),
        output_bytes=shape.output_weights,
        device_fixed=_split_device_compute(shape, params) + params.gpu_overhead,
        ram_bytes=estimate(shape, shape.n_layer + 1, params).total_cpu,
    )


__all__ = [
    "DEFAULT_GPU_OVERHEAD_BYTES",
    "DEFAULT_N_SEQ",
    "DEFAULT_N_UBATCH",
    "SPLIT_PIPELINE_COPIES",
    "EstimateParams",
    "LayerCurve",
    "LayerShape",
    "MemoryBreakdown",
    "ModelShape",
    "SplitCurve",
    "SplitEstimate",
    "estimate",
    "estimate_all",
    "estimate_split",
    "kv_cells",
    "kv_layer_bytes",
    "layer_curve",
    "layer_devices",
    "max_gpu_layers",
    "shape_from_header",
    "shape_from_model_info",
    "split_curve",
    "split_layers",
    "tensor_split_for",
]
