"""The GGUF header reader, against files written by the `gguf` package and broken files."""

from __future__ import annotations

import math
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from solver.errors import GGUFError
from solver.gguf import ArrayInfo, read_header, tensor_nbytes
from tests.support.synth import SynthShape

F16 = gguf.GGMLQuantizationType.F16
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def test_header_matches_gguf_reader(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    """Our reader and the gguf package's own reader agree on every key and tensor."""
    _, path = synth_files["mqa-mixed"]
    ours = read_header(path)
    theirs = gguf.GGUFReader(path)
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.name == b.name
        assert a.shape == tuple(int(x) for x in b.shape)
        assert a.ggml_type == b.tensor_type
        assert a.n_bytes == int(b.n_bytes)
        assert ours.data_offset + a.offset == int(b.data_offset)
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["llama.block_count"] == 6
    assert ours.metadata["llama.attention.head_count_kv"] == 1
    assert isinstance(ours.metadata["tokenizer.chat_template"], str)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 3072  # type: ignore[arg-type]


def test_tensor_sizes_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", np.zeros((3, 64), dtype=np.float32))  # ggml [64, 3] f32
    w.add_tensor("b", np.zeros((5, 64), dtype=np.float16))
    w.add_tensor("c", np.zeros((2, 2 * 34), dtype=np.uint8), raw_dtype=Q8_0)  # 2 rows of 64 Q8_0
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_header(path)
    sizes = {t.name: (t.shape, t.n_bytes) for t in h.tensors}
    assert sizes == {"a": ((64, 3), 768), "b": ((64, 5), 640), "c": ((64, 2), 136)}
    assert h.file_size == path.stat().st_size


@pytest.mark.parametrize(
    ("qtype", "shape", "expected"),
    [
        (gguf.GGMLQuantizationType.Q4_K, (4096, 14336), 4096 * 14336 // 256 * 144),
        (gguf.GGMLQuantizationType.Q6_K, (4096, 128256), 4096 * 128256 // 256 * 210),
        (gguf.GGMLQuantizationType.Q4_0, (32, 1), 18),
        (gguf.GGMLQuantizationType.F32, (7,), 28),
    ],
)
def test_tensor_nbytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...], expected: int) -> None:
    assert tensor_nbytes(qtype, shape) == expected


def test_long_arrays_are_skipped_not_decoded(gemma_file: Path) -> None:
    h = read_header(gemma_file)
    tokens = h.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, ArrayInfo)
    assert tokens.length == 262144
    assert h.architecture == "gemma3"
    assert len(h.tensors) == 236
    # llama.cpp prints "file size = 235.16 MiB" for this file: the tensor data.
    assert math.isclose(h.tensor_bytes / 2**20, 235.16, abs_tol=0.005)


def test_header_read_is_fast(gemma_file: Path) -> None:
    """Reading must not touch the weights; a generous bound that a full read (250 MB) would blow."""
    start = time.perf_counter()
    read_header(gemma_file)
    assert time.perf_counter() - start < 2.0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match=r"nope\.gguf: no such file"):
        read_header(tmp_path / "nope.gguf")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="directory"):
        read_header(tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"GG", b"PK\x03\x04" + b"\0" * 100, b"not a gguf file at all, just text\n" * 5]
)
def test_not_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=r"bad\.gguf: (not a GGUF file|truncated)"):
        read_header(path)


def test_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "v9.gguf"
    path.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + b"\0" * 32)
    with pytest.raises(GGUFError, match="unsupported GGUF version 9"):
        read_header(path)


@pytest.mark.parametrize("keep", [30, 200, 3000, 40000])
def test_truncated_header(synth_files: dict[str, tuple[SynthShape, Path]], tmp_path: Path, keep: int) -> None:
    _, src = synth_files["mha-f16"]
    path = tmp_path / "cut.gguf"
    path.write_bytes(src.read_bytes()[:keep])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated"):
        read_header(path)


def test_truncated_data(synth_files: dict[str, tuple[SynthShape, Path]], tmp_path: Path) -> None:
    _, src = synth_files["mha-f16"]
    data = src.read_bytes()
    path = tmp_path / "short.gguf"
    path.write_bytes(data[: len(data) - 1])
    with pytest.raises(GGUFError, match=r"short\.gguf: truncated GGUF file"):
        read_header(path)
