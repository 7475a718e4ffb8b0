"""Where llama.cpp's CPU backend keeps a model's weights when no GPU is in use, per kind of CPU.

On a node without a GPU (or a replica started without GPU access), llama.cpp offers
every weight first to the ggml CPU backend's *extra* buffer types, in order, then
to the plain CPU buffer (llama-model.cpp `make_cpu_buft_list`, ggml-cpu.cpp
`ggml_backend_cpu_get_extra_buffer_types`):

1. `AMX` (x86 with AMX_INT8 and AVX512_VNNI, ggml-cpu/amx/amx.cpp): a matmul weight
   whose type has AMX kernels (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS; F16 kept
   as is), with rows % 32 == 0 and a row length that is a multiple of the type's
   alignment (32 for Q4_0/Q4_1/Q8_0, 256 for the K-quants and IQ4_XS, 16 for F16).
   It is repacked into a buffer of its own, sized per row by `get_row_size`
   (ggml-cpu/amx/mmq.cpp): the blocks plus 4 bytes of compensation per block for
   Q8_0, 4 bytes of scales per block for Q4_K/Q5_K, 2 for IQ4_XS.
2. `CPU_REPACK` (ggml-cpu/repack.cpp `ggml_repack_get_optimal_repack_type`): an
   interleaved copy of the same size, for the types the CPU has kernels for —
   x86 with AVX2: Q4_0, Q4_K, IQ4_NL, MXFP4 (and Q2_K with AVX-512), rows % 8;
   ARM NEON: IQ4_NL (rows % 4); with dot product also Q4_0, Q8_0, MXFP4 (rows % 4),
   Q4_K, Q5_K, Q6_K (rows % 8); with i8mm the same types.
3. Everything else stays where the file is memory-mapped: the `CPU_Mapped`
   buffer covers the file from the first to the last byte of the tensors it
   holds (llama_model_loader::get_mapping_range), so a weight moved to an extra
   buffer still counts there when other CPU tensors lie on both sides of it.

`token_embd` is read with get_rows, not a matmul, so it always stays mapped; a
tied output layer is a second, matmul, use of it and can land in an extra buffer
as a copy. With a GPU in use, the GPU's host buffer type comes before the extra
ones, so no weight is repacked (and with mmap it becomes `CPU_Mapped`).

This module is pure: `cpu_flags` parses the text of /proc/cpuinfo, `cpu_kind`
maps flags to a `CpuKind`; reading the file is the caller's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_T = GGMLQuantizationType
TENSOR_ALIGNMENT = 32
"""ggml's TENSOR_ALIGNMENT: every tensor of an allocated buffer starts on this boundary."""


class CpuKind(StrEnum):
    """Which extra weight buffers llama.cpp's CPU backend makes on a CPU."""

    PLAIN = "plain"
    """No extra buffer (no AVX2 and no NEON): every weight stays memory-mapped."""
    X86_AVX2 = "x86-avx2"
    X86_AVX512 = "x86-avx512"
    X86_AMX = "x86-amx"
    ARM_NEON = "arm-neon"
    ARM_DOTPROD = "arm-dotprod"
    ARM_I8MM = "arm-i8mm"
    UNKNOWN = "unknown"
    """Not stated: estimates take the kind that needs the most RAM for the model."""


KNOWN_KINDS: tuple[CpuKind, ...] = tuple(k for k in CpuKind if k is not CpuKind.UNKNOWN)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor of a /proc/cpuinfo text (x86 `flags`, ARM `Features`)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.lower().split())
    return frozenset()


KIND_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_vnni", "amx_int8", "asimd", "asimddp", "i8mm")
"""Every flag `cpu_kind` reads: `kind_flags` keeps only these, so a spec states a CPU in a few words."""


def kind_flags(flags: Iterable[str]) -> list[str]:
    """The flags of `flags` that `cpu_kind` reads, in `KIND_FLAGS` order (`cpu_kind` of them is `cpu_kind(flags)`)."""
    f = {x.lower() for x in flags}
    return [x for x in KIND_FLAGS if x in f]


def cpu_kind(flags: Iterable[str]) -> CpuKind:
    """The `CpuKind` of a CPU with these /proc/cpuinfo flags (lower case, as the kernel spells them)."""
    f = {x.lower() for x in flags}
    if "amx_int8" in f and "avx512_vnni" in f:
        return CpuKind.X86_AMX
    if "avx512f" in f and "avx2" in f:
        return CpuKind.X86_AVX512
    if "avx2" in f:
        return CpuKind.X86_AVX2
    if "asimd" in f:
        if "i8mm" in f:
            return CpuKind.ARM_I8MM
        if "asimddp" in f:
            return CpuKind.ARM_DOTPROD
        return CpuKind.ARM_NEON
    return CpuKind.PLAIN


# --------------------------------------------------------------------------- per tensor

# AMX (ggml-cpu/amx/common.h qtype_has_amx_kernels, amx.cpp supports_op, mmq.cpp get_row_size):
# type -> (row-length alignment, extra bytes per block in the packed copy); F16 is kept as is.
_AMX: dict[_T, tuple[int, int]] = {
    _T.Q4_0: (32, 0),
    _T.Q4_1: (32, 0),
    _T.Q8_0: (32, 4),
    _T.Q4_K: (256, 4),
    _T.Q5_K: (256, 4),
    _T.Q6_K: (256, 0),
    _T.IQ4_XS: (256, 2),
    _T.F16: (16, 0),
}
_AMX_ROWS = 32
"""TILE_N * 2: the output rows (ne1) of an AMX matmul come in pairs of 16-row tiles."""

# CPU_REPACK (ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type): type -> rows (ne1) multiple.
_X86_AVX2: dict[_T, int] = {_T.Q4_0: 8, _T.Q4_K: 8, _T.IQ4_NL: 8, _T.MXFP4: 8}
_X86_AVX512: dict[_T, int] = {**_X86_AVX2, _T.Q2_K: 8}
_ARM_NEON: dict[_T, int] = {_T.IQ4_NL: 4}
_ARM_DOTPROD: dict[_T, int] = {
    **_ARM_NEON,
    _T.Q4_0: 4,
    _T.Q8_0: 4,
    _T.MXFP4: 4,
    _T.Q4_K: 8,
    _T.Q5_K: 8,
    _T.Q6_K: 8,
}
_REPACK: dict[CpuKind, dict[_T, int]] = {
    CpuKind.PLAIN: {},
    CpuKind.X86_AVX2: _X86_AVX2,
    CpuKind.X86_AVX512: _X86_AVX512,
    CpuKind.X86_AMX: _X86_AVX512,
    CpuKind.ARM_NEON: _ARM_NEON,
    CpuKind.ARM_DOTPROD: _ARM_DOTPROD,
    CpuKind.ARM_I8MM: _ARM_DOTPROD,
}


@dataclass(frozen=True)
class Weight:
    """One weight tensor as the CPU backend sees it."""

    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    """ggml dimensions, ne0 (the row length) first."""
    n_bytes: int
    matmul: bool
    """Used as the weight of a matmul (MUL_MAT, or MUL_MAT_ID for a 3-D expert tensor)."""
    offset: int | None = None
    """Absolute offset in the GGUF file (None when the shape was not read from a file)."""
    mapped: bool = True
    """The tensor itself is read from the file (False for the copy a tied output makes)."""


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def amx_bytes(w: Weight) -> int | None:
    """Bytes of `w` in the AMX buffer, or None when the AMX buffer does not take it."""
    rule = _AMX.get(w.ggml_type)
    if not w.matmul or rule is None or len(w.shape) != 2:
        return None
    align, extra = rule
    k, n = w.shape[0], w.shape[1]
    if n % _AMX_ROWS or k % align:
        return None
    if w.ggml_type is _T.F16:
        return w.n_bytes
    block, size = GGML_QUANT_SIZES[w.ggml_type]
    return n * (k // block) * (size + extra)


def repack_bytes(kind: CpuKind, w: Weight) -> int | None:
    """Bytes of `w` in the CPU_REPACK buffer on a `kind` CPU, or None when it is not repacked."""
    rows = _REPACK.get(kind, {}).get(w.ggml_type)
    if not w.matmul or rows is None or len(w.shape) not in (2, 3) or w.shape[1] % rows:
        return None
    return w.n_bytes


@dataclass(frozen=True)
class CpuWeights:
    """A model's weights on a CPU of one kind, with no GPU in use: what each buffer holds."""

    mapped: int
    """The CPU_Mapped buffer (the file span of the weights left in place), bytes."""
    extra: Mapping[str, int] = field(default_factory=dict)
    """Extra buffers by llama.cpp's name (`AMX`, `CPU_REPACK`), bytes; absent when empty."""

    @property
    def extra_total(self) -> int:
        return sum(self.extra.values())

    @property
    def total(self) -> int:
        return self.mapped + self.extra_total


def cpu_weights(kind: CpuKind, weights: Sequence[Weight]) -> CpuWeights:
    """Where llama.cpp puts `weights` on a `kind` CPU (not UNKNOWN) with no GPU in use."""
    if kind is CpuKind.UNKNOWN:
        raise ValueError("cpu_weights needs a known CpuKind")
    extra: dict[str, int] = {}
    kept: list[Weight] = []
    for w in weights:
        amx = amx_bytes(w) if kind is CpuKind.X86_AMX else None
        rep = repack_bytes(kind, w) if amx is None else None
        if amx is not None:
            extra["AMX"] = extra.get("AMX", 0) + _pad(amx, TENSOR_ALIGNMENT)
        elif rep is not None:
            extra["CPU_REPACK"] = extra.get("CPU_REPACK", 0) + _pad(rep, TENSOR_ALIGNMENT)
        elif w.mapped:
            kept.append(w)
    offsets = [w.offset for w in kept]
    if kept and all(o is not None for o in offsets):
        first = min(w.offset for w in kept if w.offset is not None)
        last = max(w.offset + w.n_bytes for w in kept if w.offset is not None)
        mapped = last - first
    else:
        mapped = sum(w.n_bytes for w in kept)
    return CpuWeights(mapped, extra)


def cpu_weights_by_kind(weights: Sequence[Weight]) -> dict[CpuKind, CpuWeights]:
    """`cpu_weights` for every known kind, and UNKNOWN as the kind that needs the most bytes."""
    out = {k: cpu_weights(k, weights) for k in KNOWN_KINDS}
    out[CpuKind.UNKNOWN] = max(out.values(), key=lambda c: c.total)
    return out
