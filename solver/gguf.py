"""Read a GGUF file's header — metadata and tensor infos — without touching the weights.

The header is parsed straight from a read-only memory map, so only the pages of
the header are read: a 20 GB model costs the same as a 20 MB one. Long arrays
(the tokenizer's hundreds of thousands of strings) are skipped and kept only as
their length (`ArrayInfo`).

`gguf.GGUFReader` would do the parsing, but it decodes every token string with
numpy (about 15 s for a 262k-token vocabulary), so the format (v2, v3; little
endian) is parsed here; the `gguf` package still supplies the tensor type table.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from solver.errors import GGUFError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_KEPT_ARRAY = 4096
"""Arrays longer than this are kept as `ArrayInfo` (type and length) only."""


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too long to be worth decoding: its element type and length."""

    item_type: str
    length: int

    def __len__(self) -> int:
        return self.length


Scalar = int | float | bool | str
MetaValue = Scalar | tuple[Scalar, ...] | ArrayInfo

# GGUF value types: id -> (name, struct format or None for strings/arrays)
_VT_UINT8, _VT_INT8, _VT_UINT16, _VT_INT16, _VT_UINT32, _VT_INT32 = 0, 1, 2, 3, 4, 5
_VT_FLOAT32, _VT_BOOL, _VT_STRING, _VT_ARRAY, _VT_UINT64, _VT_INT64, _VT_FLOAT64 = 6, 7, 8, 9, 10, 11, 12
_SCALAR_FMT: dict[int, str] = {
    _VT_UINT8: "<B",
    _VT_INT8: "<b",
    _VT_UINT16: "<H",
    _VT_INT16: "<h",
    _VT_UINT32: "<I",
    _VT_INT32: "<i",
    _VT_FLOAT32: "<f",
    _VT_BOOL: "<?",
    _VT_UINT64: "<Q",
    _VT_INT64: "<q",
    _VT_FLOAT64: "<d",
}
_TYPE_NAMES: dict[int, str] = {
    _VT_UINT8: "uint8",
    _VT_INT8: "int8",
    _VT_UINT16: "uint16",
    _VT_INT16: "int16",
    _VT_UINT32: "uint32",
    _VT_INT32: "int32",
    _VT_FLOAT32: "float32",
    _VT_BOOL: "bool",
    _VT_STRING: "string",
    _VT_ARRAY: "array",
    _VT_UINT64: "uint64",
    _VT_INT64: "int64",
    _VT_FLOAT64: "float64",
}


def tensor_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `ggml_type` with ggml dimensions `shape` (ne0 first)."""
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    n = math.prod(shape)
    if shape and shape[0] % block:
        raise ValueError(f"row of {shape[0]} elements is not a multiple of the {ggml_type.name} block {block}")
    return n // block * type_size


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file, as its header describes it."""

    name: str
    shape: tuple[int, ...]
    """ggml dimensions, ne0 (the row length) first."""
    ggml_type: GGMLQuantizationType
    offset: int
    """Offset from the start of the tensor data section."""
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Metadata and tensor infos of a GGUF file (or of a model described the same way)."""

    metadata: Mapping[str, MetaValue]
    tensors: tuple[TensorInfo, ...]
    path: str = ""
    version: int = 3
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path or 'model'}: no general.architecture in the GGUF metadata")
        return arch

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def tensor(self, name: str) -> TensorInfo | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; running off the end is a truncation."""

    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated GGUF header (needs {self.pos + n} bytes, file has {self.size})")

    def unpack(self, fmt: str) -> Scalar:
        n = struct.calcsize(fmt)
        self._need(n)
        value: Scalar = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def string(self) -> str:
        n = self.u64()
        self._need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        self._need(8 * count)  # each string takes 8 bytes at least: a count the file cannot hold fails now
        buf, pos, size = self.buf, self.pos, self.size
        unpack_from = struct.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self._need(8)
            pos += 8 + unpack_from("<Q", buf, pos)[0]
        self.pos = pos
        self._need(0)

    def value(self, vtype: int) -> MetaValue:
        if vtype == _VT_STRING:
            return self.string()
        if vtype == _VT_ARRAY:
            item_type = self.u32()
            count = self.u64()
            if item_type not in _TYPE_NAMES or item_type == _VT_ARRAY:
                raise GGUFError(f"{self.path}: unsupported GGUF array element type {item_type}")
            if count > MAX_KEPT_ARRAY:
                if item_type == _VT_STRING:
                    self.skip_strings(count)
                else:
                    n = struct.calcsize(_SCALAR_FMT[item_type]) * count
                    self._need(n)
                    self.pos += n
                return ArrayInfo(_TYPE_NAMES[item_type], count)
            items = [self.value(item_type) for _ in range(count)]
            return tuple(i for i in items if not isinstance(i, (tuple, ArrayInfo)))
        fmt = _SCALAR_FMT.get(vtype)
        if fmt is None:
            raise GGUFError(f"{self.path}: unknown GGUF value type {vtype}")
        return self.unpack(fmt)


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read the header of the GGUF file at `path`.

    Raises GGUFError (naming the file) when the file is missing, unreadable, not
    a regular file, not GGUF, of an unsupported version, or shorter than its header says.
    A FIFO or a device is refused after a stat, before it is opened, and the file is
    opened without blocking: nothing here waits for a writer.
    """
    p = Path(path)
    name = str(p)
    try:
        _check_regular(os.stat(p), name)
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with open(fd, "rb") as f:
            _check_regular(os.fstat(f.fileno()), name)
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                head = f.read(4)
                if head != GGUF_MAGIC[: len(head)] or not head:
                    raise GGUFError(f"{name}: not a GGUF file (bad magic)")
                raise GGUFError(f"{name}: truncated GGUF header ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, name, size)
    except FileNotFoundError:
        raise GGUFError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise GGUFError(f"{name}: is a directory, not a GGUF file") from None
    except PermissionError:
        raise GGUFError(f"{name}: permission denied") from None
    except ValueError:  # a NUL byte in the path
        raise GGUFError(f"{name!r}: not a valid file name") from None
    except OSError as exc:
        raise GGUFError(f"{name}: cannot read ({exc.strerror or exc})") from None


def _check_regular(st: os.stat_result, name: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError(f"{name}: is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) else "special"
        raise GGUFError(f"{name}: is {kind}, not a regular file")


def _parse(buf: mmap.mmap, name: str, size: int) -> GGUFHeader:
    cur = _Cursor(buf, name)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFError(f"{name}: not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.u32()
    if version not in (2, 3):
        raise GGUFError(f"{name}: unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = cur.u64()
    n_kv = cur.u64()
    # Each entry takes at least 8 (+ 4 + 8 …) bytes: reject absurd counts before looping.
    if n_kv > size // 13 or n_tensors > size // 24:
        raise GGUFError(f"{name}: truncated or corrupt GGUF header (claims {n_kv} keys, {n_tensors} tensors)")

    metadata: dict[str, MetaValue] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.u32()
        metadata[key] = cur.value(vtype)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFError(f"{name}: bad general.alignment {alignment!r}")

    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        tname = cur.string()
        n_dims = cur.u32()
        if n_dims > 8:
            raise GGUFError(f"{name}: tensor {tname!r} has {n_dims} dimensions; corrupt header")
        shape = tuple(cur.u64() for _ in range(n_dims))
        type_id = cur.u32()
        offset = cur.u64()
        try:
            ggml_type = GGMLQuantizationType(type_id)
            n_bytes = tensor_nbytes(ggml_type, shape)
        except (ValueError, KeyError):
            raise GGUFError(f"{name}: tensor {tname!r} has unknown or invalid type {type_id}") from None
        tensors.append(TensorInfo(tname, shape, ggml_type, offset, n_bytes))

    data_offset = -(-cur.pos // alignment) * alignment
    data_end = max((data_offset + t.offset + t.n_bytes for t in tensors), default=data_offset)
    if data_end > size:
        raise GGUFError(f"{name}: truncated GGUF file (tensor data ends at byte {data_end}, file has {size})")
    return GGUFHeader(
        metadata=metadata,
        tensors=tuple(tensors),
        path=name,
        version=version,
        data_offset=data_offset,
        file_size=size,
    )
