"""Hostile GGUF headers (issue 23): every crafted file ends in one GGUFError naming the file, or in a
correct estimate, within 2 s of CPU and 500 MB, never in a traceback, a hang or a negative figure.

The files are written here, byte by byte (`gguf_bytes`), so that any field can lie: counts beyond
the file, 2**32-1 blocks, strings, NaN and inf where numbers belong, negative head counts, absurd
tensor dimensions. Each case reads the header, derives the shape and builds the full `estimate`
table and the solver's layer curve, in a forked child that measures CPU time and memory. Hypothesis
then mutates the bytes of a valid header.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solver.errors import EstimateError, GGUFError
from solver.estimate import EstimateParams, estimate_all, layer_curve, shape_from_header
from solver.gguf import read_header
from specs.enums import KVCacheType, LayerOrder
from tests.support.bounded import check_bounded, run_bounded

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}  # fmt: skip
F16_TYPE = 1


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: object) -> bytes:
    if vtype == STR:
        assert isinstance(value, (str, bytes))
        return _str(value)
    if vtype == ARR:
        assert isinstance(value, tuple)
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_value(item_type, i) for i in items)
    return struct.pack(_FMT[vtype], value)


Meta = dict[str, tuple[int, object]]
Tensor = tuple[str, tuple[int, ...], int, int]


def base_meta(n_layer: int = 2) -> Meta:
    return {
        "general.architecture": (STR, "llama"),
        "general.name": (STR, "tiny"),
        "llama.block_count": (U32, n_layer),
        "llama.embedding_length": (U32, 64),
        "llama.attention.head_count": (U32, 4),
        "llama.attention.head_count_kv": (U32, 2),
        "llama.feed_forward_length": (U32, 128),
        "llama.context_length": (U32, 2048),
        "llama.vocab_size": (U32, 256),
    }


def base_tensors(n_layer: int = 2) -> list[Tensor]:
    out: list[Tensor] = [("token_embd.weight", (64, 256), F16_TYPE, 0)]
    for il in range(n_layer):
        out += [(f"blk.{il}.attn_q.weight", (64, 64), F16_TYPE, 0), (f"blk.{il}.ffn_up.weight", (64, 128), F16_TYPE, 0)]
    out.append(("output.weight", (64, 256), F16_TYPE, 0))
    return out


def gguf_bytes(
    meta: Meta,
    tensors: list[Tensor],
    *,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    data: bool = True,
    version: int = 3,
) -> bytes:
    """A GGUF file: tensors get consecutive offsets (their given offset added) and zeroed data."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(meta) if n_kv is None else n_kv)  # fmt: skip
    kvs = b"".join(_str(k) + struct.pack("<I", vt) + _value(vt, v) for k, (vt, v) in meta.items())
    infos = b""
    offset = 0
    for name, dims, ttype, extra in tensors:
        n = 2
        for d in dims:
            n *= d
        infos += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ttype, offset + extra)
        offset += -(-min(n, 1 << 24) // 32) * 32
    body = head + kvs + infos
    body += b"\0" * (-len(body) % 32)
    return body + (b"\0" * offset if data else b"")


def with_meta(**changes: tuple[int, object] | None) -> bytes:
    meta = base_meta()
    for key, value in changes.items():
        full = key.replace("__", ".")
        if value is None:
            meta.pop(full, None)
        else:
            meta[full] = value
    return gguf_bytes(meta, base_tensors())


PARAMS = EstimateParams(ctx=4096, cache_type=KVCacheType.F16, flash_attn=True, layer_order=LayerOrder.OUTPUT_FIRST)


def estimate_table(path: Path) -> str:
    """What `homelab estimate` and the solver do with a file: the whole table and the layer curve."""
    shape = shape_from_header(read_header(path))
    table = estimate_all(shape, PARAMS)
    curve = layer_curve(shape, PARAMS)
    for b in table:
        assert b.total_gpu >= 0 and b.total_cpu >= 0, b
    assert all(v >= 0 for v in (*curve.gpu_per_block, *curve.cpu_per_block, *curve.gpu_fixed, *curve.cpu_fixed))
    return f"{shape.n_layer} layers, {table[-1].total_gpu} bytes at full offload"


NAN, INF = float("nan"), float("inf")
CASES: list[tuple[str, bytes, str | None]] = [
    ("valid", gguf_bytes(base_meta(), base_tensors()), None),
    ("block-count-10000", with_meta(llama__block_count=(U32, 10000)), r"block_count is 10000, outside 1 … 512"),
    ("block-count-2**32-1", with_meta(llama__block_count=(U32, 2**32 - 1)), r"block_count is 4294967295, outside"),
    ("block-count-2**64-1", with_meta(llama__block_count=(U64, 2**64 - 1)), r"block_count is \d+, outside"),
    ("block-count-zero", with_meta(llama__block_count=(U32, 0)), r"block_count is 0, outside 1"),
    ("block-count-negative", with_meta(llama__block_count=(I32, -5)), r"block_count is -5, outside"),
    (
        "block-count-string",
        with_meta(llama__block_count=(STR, "many")),
        r"block_count must be a whole number, got 'many'",
    ),
    ("block-count-nan", with_meta(llama__block_count=(F32, NAN)), r"block_count must be a whole number, got nan"),
    ("block-count-inf", with_meta(llama__block_count=(F64, INF)), r"block_count must be a whole number, got inf"),
    ("block-count-float-ok", with_meta(llama__block_count=(F32, 2.0)), None),
    ("block-count-bool", with_meta(llama__block_count=(BOOL, True)), r"must be a whole number, got True"),
    ("block-count-array", with_meta(llama__block_count=(ARR, (U32, [2, 2]))), r"must be a whole number"),
    ("embedding-huge", with_meta(llama__embedding_length=(U64, 2**62)), r"embedding_length is \d+, outside"),
    (
        "embedding-string",
        with_meta(llama__embedding_length=(STR, "\x1b[2J")),
        r"must be a whole number, got '\\x1b\[2J'",
    ),
    ("head-count-negative", with_meta(llama__attention__head_count=(I32, -8)), r"head_count is -8, outside 0"),
    ("head-count-kv-negative", with_meta(llama__attention__head_count_kv=(I32, -2)), r"head_count_kv is -2"),
    ("head-count-nan", with_meta(llama__attention__head_count=(F32, NAN)), r"head_count must be a whole number"),
    ("head-count-array-short", with_meta(llama__attention__head_count=(ARR, (U32, [4]))), r"has 1 entries for 2"),
    ("head-count-array-negative", with_meta(llama__attention__head_count=(ARR, (I32, [4, -4]))), r"is -4, outside"),
    ("head-count-array-strings", with_meta(llama__attention__head_count=(ARR, (STR, ["a", "b"]))), r"whole number"),
    ("head-count-huge", with_meta(llama__attention__head_count=(U32, 2**31)), r"head_count is \d+, outside"),
    ("key-length-inf", with_meta(llama__attention__key_length=(F32, INF)), r"key_length must be a whole number"),
    ("key-length-negative", with_meta(llama__attention__key_length=(I32, -64)), r"key_length is -64"),
    ("ff-huge", with_meta(llama__feed_forward_length=(U64, 2**40)), r"feed_forward_length is \d+, outside"),
    ("vocab-huge-tensor-wins-ok", with_meta(llama__vocab_size=(U64, 2**40)), None),
    (
        "vocab-huge",
        gguf_bytes({**base_meta(), "llama.vocab_size": (U64, 2**40)}, base_tensors()[1:]),
        r"vocab_size is \d+, outside",
    ),
    ("context-nan", with_meta(llama__context_length=(F64, NAN)), r"context_length must be a whole number"),
    ("expert-count-huge", with_meta(llama__expert_count=(U32, 2**31)), r"expert_count is \d+, outside"),
    ("sliding-window-string", with_meta(llama__attention__sliding_window=(STR, "wide")), r"sliding_window must be"),
    (
        "swa-pattern-huge",
        with_meta(llama__attention__sliding_window=(U32, 512), llama__attention__sliding_window_pattern=(U32, 2**31)),
        r"sliding_window_pattern",
    ),
    ("architecture-missing", with_meta(general__architecture=None), r"no general\.architecture"),
    ("architecture-number", with_meta(general__architecture=(U32, 7)), r"no general\.architecture"),
    ("architecture-long", with_meta(general__architecture=(STR, "x" * 5000)), r"is not an architecture name"),
    ("name-markup-escapes-ok", with_meta(general__name=(STR, "[/red]\x1b]0;pwned\x07 :100:")), None),
    ("name-invalid-utf8-ok", with_meta(general__name=(STR, b"\xff\xfe")), None),
    ("alignment-zero", with_meta(general__alignment=(U32, 0)), r"bad general\.alignment 0"),
    ("alignment-string", with_meta(general__alignment=(STR, "32")), r"bad general\.alignment"),
    ("alignment-huge", with_meta(general__alignment=(U64, 2**63)), r"truncated GGUF file"),
    (
        "n-tensors-beyond-file",
        gguf_bytes(base_meta(), base_tensors(), n_tensors=2**40),
        r"claims \d+ keys, \d+ tensors",
    ),
    ("n-kv-beyond-file", gguf_bytes(base_meta(), base_tensors(), n_kv=2**63), r"claims \d+ keys"),
    ("n-tensors-one-more", gguf_bytes(base_meta(), base_tensors(), n_tensors=7, data=False), r"truncated"),
    (
        "tensor-dims-huge",
        gguf_bytes(base_meta(), [*base_tensors(), ("blk.0.x", (2**32, 2**32), F16_TYPE, 0)]),
        r"truncated GGUF file \(tensor data ends",
    ),
    ("tensor-9-dims", gguf_bytes(base_meta(), [*base_tensors(), ("blk.0.x", (1,) * 9, F16_TYPE, 0)]), r"9 dimensions"),
    (
        "tensor-offset-huge",
        gguf_bytes(base_meta(), [("token_embd.weight", (64, 256), F16_TYPE, 2**62)]),
        r"truncated GGUF file",
    ),
    (
        "tensor-type-unknown",
        gguf_bytes(base_meta(), [("token_embd.weight", (64, 256), 9999, 0)]),
        r"unknown or invalid type",
    ),
    (
        "tensor-block-beyond",
        gguf_bytes(base_meta(), [*base_tensors(), ("blk.7.x", (32,), F16_TYPE, 0)]),
        r"blk\.7\.x is beyond block_count 2",
    ),
    (
        "tensor-block-5000-digits",
        gguf_bytes(base_meta(), [*base_tensors(), ("blk." + "9" * 5000 + ".x", (32,), F16_TYPE, 0)]),
        r"is beyond block_count 2",
    ),
    (
        "array-count-huge",
        with_meta(tokenizer__ggml__tokens=(ARR, (STR, []))).replace(
            struct.pack("<IQ", STR, 0), struct.pack("<IQ", STR, 2**60)
        ),
        r"truncated",
    ),
    ("array-of-arrays", with_meta(x=(ARR, (ARR, ()))), r"unsupported GGUF array element type 9"),
    (
        "string-length-huge",
        with_meta(general__name=(STR, "abc")).replace(_str("abc"), struct.pack("<Q", 2**63) + b"abc"),
        r"truncated GGUF header",
    ),
    (
        "value-type-unknown",
        with_meta(general__name=(STR, "x")).replace(
            _str("general.name") + struct.pack("<I", STR), _str("general.name") + struct.pack("<I", 77)
        ),
        r"unknown GGUF value type 77",
    ),
    ("version-99", gguf_bytes(base_meta(), base_tensors(), version=99), r"unsupported GGUF version 99"),
    ("bad-magic", b"GGUX" + b"\0" * 100, r"not a GGUF file"),
    ("empty", b"", r"not a GGUF file"),
    ("truncated-head", gguf_bytes(base_meta(), base_tensors())[:100], r"truncated"),
    ("no-data", gguf_bytes(base_meta(), base_tensors(), data=False), r"truncated GGUF file"),
]
assert len({c[0] for c in CASES}) == len(CASES)


def _check_error(text: str, path: Path, fragment: str) -> None:
    import re

    lines = text.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: "), lines[0]
    assert re.search(fragment, lines[0]), lines[0]
    assert not re.search(r"[\x00-\x1f\x7f]", lines[0]), repr(lines[0])


@pytest.mark.parametrize(("content", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_gguf(tmp_path: Path, content: bytes, fragment: str | None) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    outcome = run_bounded(lambda: estimate_table(path), (GGUFError, EstimateError))
    check_bounded(outcome)
    if fragment is None:
        assert outcome.kind == "ok", outcome.text
    else:
        assert outcome.kind == "error", outcome.text[:500]
        _check_error(outcome.text, path, fragment)


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.gguf"
    os.mkfifo(path)
    return path


def _dir(tmp_path: Path) -> Path:
    path = tmp_path / "dir.gguf"
    path.mkdir()
    return path


def _zero_link(tmp_path: Path) -> Path:
    path = tmp_path / "zero.gguf"
    path.symlink_to("/dev/zero")
    return path


FILES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("fifo-no-writer", _fifo, r"is a FIFO, not a regular file"),
    ("dev-zero", lambda _: Path("/dev/zero"), r"is a device, not a regular file"),
    ("symlink-to-dev-zero", _zero_link, r"is a device, not a regular file"),
    ("directory", _dir, r"is a directory, not a GGUF file"),
    ("missing", lambda p: p / "none.gguf", r"no such file"),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in FILES], ids=[c[0] for c in FILES])
def test_odd_gguf_files(tmp_path: Path, make: Callable[[Path], Path], fragment: str) -> None:
    path = make(tmp_path)
    outcome = run_bounded(lambda: estimate_table(path), (GGUFError, EstimateError))
    check_bounded(outcome)
    assert outcome.kind == "error", outcome.text
    _check_error(outcome.text, path, fragment)


def test_nul_byte_in_path() -> None:
    with pytest.raises(GGUFError, match=r"not a valid file name"):
        read_header("/srv/m\0.gguf")


@settings(
    max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(CASES[0][1]) - 1),
            st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff", b"\x00\x00\xc0\x7f", b"\x80"])
            | st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_gguf_header(tmp_path: Path, edits: list[tuple[int, bytes]]) -> None:
    """Overwritten bytes of a valid header: a GGUFError/EstimateError or a sane estimate, nothing else."""
    data = bytearray(CASES[0][1])
    for pos, chunk in edits:
        data[pos : pos + len(chunk)] = chunk
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(data))
    try:
        estimate_table(path)
    except (GGUFError, EstimateError) as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
