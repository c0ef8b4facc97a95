"""Open a GGUF v2/v3 file and check every bound before trusting it.

The `gguf` library supplies the format's tables (value types, ggml types, block sizes); its
`GGUFReader` trusts the counts in the header (a lying array length makes it allocate or loop for
ever), so the header walk is ours: one pass over the metadata, each length checked against the
bytes that remain before it is used. Tensor data is never read here, only memory-mapped.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_TENSOR_NAME = 64  # llama.cpp's GGML_MAX_NAME, terminator included
MAX_KEY_LEN = 65535
INT64_MAX = 2**63 - 1
_U64 = struct.Struct("<Q")

_SCALAR = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", np.uint8),
    GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16),
    GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32),
    GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32),
    GGUFValueType.BOOL: ("<?", np.bool_),
    GGUFValueType.UINT64: ("<Q", np.uint64),
    GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
}
# ggml types that exist in the table but no longer have a defined layout (Q4_2, Q4_3 were removed).
_KNOWN_TYPES = {t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


class GGUFError(ValueError):
    """A GGUF file that cannot be trusted: says what is wrong and where."""

    def __init__(self, path: str | os.PathLike, what: str, where: str | None = None):
        self.path = str(path)
        self.what = what
        self.where = where
        msg = f"{self.path}: {what}" + (f" (at {where})" if where else "")
        super().__init__(msg)

    def __reduce__(self):  # the default pickles args=(msg,), which does not fit __init__
        return type(self), (self.path, self.what, self.where)


@dataclass(frozen=True)
class TensorRef:
    """A bounds-checked tensor in a GGUF file. `shape` is torch order (rows, cols); `ne` is ggml order."""

    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


class _Cursor:
    """Reads little-endian values from a buffer, refusing to step past its end."""

    def __init__(self, buf: memoryview | bytes, path: str):
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.remaining():
            raise GGUFError(
                self.path,
                f"{what}: needs {n} bytes but only {self.remaining()} remain in the file",
                f"offset {self.pos}",
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str, max_len: int | None = None) -> str:
        start = self.pos
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            raise GGUFError(self.path, f"{what}: length {n} exceeds the limit of {max_len}", f"offset {start}")
        self.need(n, f"{what} ({n} bytes)")
        self.pos += n
        return self._decode(self.pos - n, n, what, start)

    def strings(self, count: int, what: str) -> list[str]:
        """`count` length-prefixed strings; messages are only formatted on failure (vocabularies are long)."""
        out = []
        buf, end, pos = self.buf, self.end, self.pos
        for i in range(count):
            if end - pos < 8:
                self.pos = pos
                self.need(8, f"{what}[{i}] length")
            (n,) = _U64.unpack_from(buf, pos)
            if n > end - pos - 8:
                self.pos = pos + 8
                self.need(n, f"{what}[{i}] ({n} bytes)")
            out.append(self._decode(pos + 8, n, f"{what}[{i}]", pos))
            pos += 8 + n
        self.pos = pos
        return out

    def _decode(self, pos: int, n: int, what: str, start: int) -> str:
        try:
            return str(self.buf[pos : pos + n], "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(self.path, f"{what}: not valid UTF-8 ({e.reason})", f"offset {start}") from None


class GGUFFile:
    """A validated, memory-mapped GGUF file: typed metadata and `TensorRef`s.

    Use as a context manager or call `close()`. Metadata is copied out of the file and outlives `close()`;
    views from `tensor_bytes` keep the mapping alive for as long as they are referenced.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._mm: mmap.mmap | None = None
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below as not a regular file.
            self._fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
        except OSError as e:
            raise GGUFError(path, f"cannot open: {e.strerror}") from None
        try:
            st = os.fstat(self._fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise GGUFError(path, "not a regular file")
            self.file_size = st.st_size
            if self.file_size == 0:
                raise GGUFError(path, "file is empty")
            try:
                self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise GGUFError(path, f"cannot map: {e}") from None
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing -----------------------------------------------------------------------------

    def _parse(self) -> None:
        # Released on the way out, even when a GGUFError is kept (its traceback holds the cursor): a live view
        # would pin the mapping and its file descriptor. Nothing parsed may alias the view (arrays are copied).
        view = memoryview(self._mm)
        try:
            self._parse_view(_Cursor(view, self.path))
        finally:
            view.release()

    def _parse_view(self, cur: _Cursor) -> None:
        cur.need(4, "magic")
        magic = bytes(cur.buf[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(self.path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')", "offset 0")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            hint = " (big-endian files are not supported)" if swapped in (2, 3) else ""
            raise GGUFError(self.path, f"unsupported GGUF version {self.version}{hint}", "offset 4")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Each KV takes at least 13 bytes (8 key length + 1 key byte... + 4 type), each tensor info
        # at least 29 (8 name length + 1 + 4 n_dims + 8 dim + 4 type + 8 offset): refuse lies early.
        if n_kv * 13 > cur.remaining():
            raise GGUFError(self.path, f"metadata count {n_kv} cannot fit in a {self.file_size}-byte file",
                            "offset 16")
        if n_tensors * 29 > cur.remaining():
            raise GGUFError(self.path, f"tensor count {n_tensors} cannot fit in a {self.file_size}-byte file",
                            "offset 8")

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            key_at = cur.pos
            key = cur.string(f"metadata key #{i}", MAX_KEY_LEN)
            if not key:
                raise GGUFError(self.path, f"metadata key #{i} is empty", f"offset {key_at}")
            if key in self.metadata:
                raise GGUFError(self.path, f"duplicate metadata key {key!r}", f"offset {key_at}")
            vtype = self._value_type(cur.u32(f"type of {key!r}"), key, cur.pos - 4)
            self.metadata_types[key] = vtype
            self.metadata[key] = self._value(cur, vtype, key)

        self.alignment = self._alignment()
        self.tensors: dict[str, TensorRef] = {}
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            info = self._tensor_info(cur, i)
            if info[0] in names:
                raise GGUFError(self.path, f"duplicate tensor name {info[0]!r}", f"offset {info[-1]}")
            names.add(info[0])
            infos.append(info)

        pad = (-cur.pos) % self.alignment
        self.data_offset = cur.pos + pad
        if n_tensors and self.data_offset > self.file_size:
            raise GGUFError(self.path, f"data section starts at {self.data_offset}, past end of file", "tensor data")
        for name, gtype, ne, rel, nbytes, info_at in infos:
            if rel % self.alignment:
                raise GGUFError(
                    self.path, f"tensor {name}: offset {rel} is not a multiple of alignment {self.alignment}",
                    f"offset {info_at}",
                )
            start = self.data_offset + rel
            if start + nbytes > self.file_size:
                raise GGUFError(
                    self.path,
                    f"tensor {name}: data [{start}, {start + nbytes}) runs past end of file ({self.file_size} bytes)",
                    f"offset {info_at}",
                )
            self.tensors[name] = TensorRef(name, gtype, ne, start, nbytes)
        self._check_overlap()

    def _value_type(self, raw: int, key: str, at: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(self.path, f"metadata {key!r}: unknown value type {raw}", f"offset {at}") from None

    def _value(self, cur: _Cursor, vtype: GGUFValueType, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return cur.string(f"metadata {key!r}")
        if vtype == GGUFValueType.ARRAY:
            return self._array(cur, key)
        fmt, _ = _SCALAR[vtype]
        v = cur.scalar(fmt, f"metadata {key!r}")
        if vtype == GGUFValueType.BOOL:
            return bool(v)
        return v

    def _array(self, cur: _Cursor, key: str) -> Any:
        at = cur.pos
        etype = self._value_type(cur.u32(f"element type of {key!r}"), key, at)
        count = cur.u64(f"element count of {key!r}")
        if etype == GGUFValueType.ARRAY:
            raise GGUFError(self.path, f"metadata {key!r}: nested arrays are not supported", f"offset {at}")
        if etype == GGUFValueType.STRING:
            if count * 8 > cur.remaining():
                raise GGUFError(
                    self.path, f"metadata {key!r}: {count} strings cannot fit in the {cur.remaining()} bytes left",
                    f"offset {at}",
                )
            return cur.strings(count, f"metadata {key!r}")
        fmt, dtype = _SCALAR[etype]
        nbytes = count * struct.calcsize(fmt)
        cur.need(nbytes, f"metadata {key!r}: array of {count} {etype.name}")
        # A copy: metadata outlives close() and must not keep the file mapped.
        arr = np.frombuffer(cur.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=cur.pos).copy()
        cur.pos += nbytes
        return arr

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        a = self.metadata["general.alignment"]
        if self.metadata_types["general.alignment"] != GGUFValueType.UINT32 or a <= 0 or a & (a - 1):
            raise GGUFError(self.path, f"general.alignment must be a power-of-two uint32, got {a!r}",
                            "general.alignment")
        return a

    def _tensor_info(self, cur: _Cursor, i: int) -> tuple:
        at = cur.pos
        name = cur.string(f"tensor #{i} name", MAX_TENSOR_NAME - 1)
        where = f"offset {at}"
        if not name:
            raise GGUFError(self.path, f"tensor #{i} has an empty name", where)
        n_dims = cur.u32(f"tensor {name} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(self.path, f"tensor {name}: n_dims {n_dims} outside 1..{MAX_DIMS}", where)
        ne = tuple(cur.u64(f"tensor {name} dim {d}") for d in range(n_dims))
        n = 1
        for d, size in enumerate(ne):
            if size == 0 or size > INT64_MAX:
                raise GGUFError(self.path, f"tensor {name}: dim {d} is {size} (must be 1..2^63-1)", where)
            n *= size
            if n > INT64_MAX:
                raise GGUFError(self.path, f"tensor {name}: element count {ne} overflows int64", where)
        raw_type = cur.u32(f"tensor {name} type")
        try:
            gtype = GGMLQuantizationType(raw_type)
        except ValueError:
            gtype = None
        if gtype not in _KNOWN_TYPES:
            raise GGUFError(self.path, f"tensor {name}: unknown ggml type id {raw_type}", where)
        block, type_size = GGML_QUANT_SIZES[gtype]
        if ne[0] % block:
            raise GGUFError(
                self.path, f"tensor {name}: first dim {ne[0]} is not a multiple of {gtype.name} block size {block}",
                where,
            )
        nbytes = n // block * type_size
        rel = cur.u64(f"tensor {name} offset")
        return name, gtype, ne, rel, nbytes, at

    def _check_overlap(self) -> None:
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, name), (start, _, nxt) in zip(spans, spans[1:]):
            if start < end:
                raise GGUFError(self.path, f"tensor {nxt} overlaps tensor {name} (starts at {start} before {end})",
                                f"tensor {nxt}")

    # -- access ------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(self.path, "missing general.architecture", "general.architecture")
        return arch

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """Metadata under the architecture prefix: arch_get('block_count') reads '<arch>.block_count'."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a read-only uint8 view of the mapped file (no copy)."""
        try:
            t = self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, f"tensor {name} not found") from None
        if self._mm is None:
            raise GGUFError(self.path, f"tensor {name}: file is closed")
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still alive; the mapping goes with them
            self._mm = None
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
            self._fh = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: str | os.PathLike | Path) -> GGUFFile:
    """Open and validate a GGUF file; raises GGUFError naming what is wrong and where."""
    return GGUFFile(path)
