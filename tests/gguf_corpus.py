"""Malformed GGUF files for the reader's tests: one valid small file, then precise corruptions.

The valid file is written by `gguf.GGUFWriter`; `layout()` walks it (trusting it, it is ours) and records
where every header field lies, so each corruption patches exactly the bytes it means to.
"""

from __future__ import annotations

import functools
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quantize

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
ALIGN = 32

# One key per value type, and arrays of strings and numbers. "test.u8" and "test.i8" have the same length so
# one can be patched into the other (duplicate keys); likewise the tensor names.
SCALARS = {
    "test.u8": (GGUFValueType.UINT8, 200),
    "test.i8": (GGUFValueType.INT8, -100),
    "test.u16": (GGUFValueType.UINT16, 60000),
    "test.i16": (GGUFValueType.INT16, -30000),
    "test.u32": (GGUFValueType.UINT32, 4_000_000_000),
    "test.i32": (GGUFValueType.INT32, -2_000_000_000),
    "test.f32": (GGUFValueType.FLOAT32, 0.5),
    "test.bool": (GGUFValueType.BOOL, True),
    "test.u64": (GGUFValueType.UINT64, 2**63 + 5),
    "test.i64": (GGUFValueType.INT64, -(2**62)),
    "test.f64": (GGUFValueType.FLOAT64, 1e300),
    "test.str": (GGUFValueType.STRING, "héllo"),
}
ARRAYS = {
    "test.arr_str": (GGUFValueType.STRING, ["a", "bc", "", "déf"]),
    "test.arr_i32": (GGUFValueType.INT32, [1, -2, 3]),
    "test.arr_f32": (GGUFValueType.FLOAT32, [0.25, -1.5]),
    "test.arr_u8": (GGUFValueType.UINT8, [0, 7, 255]),
}


def _tensors() -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    rng = np.random.default_rng(0)
    return {
        "t0.f32": (rng.standard_normal((3, 8)).astype(np.float32), GGMLQuantizationType.F32),
        "t1.f16": (rng.standard_normal(16).astype(np.float16), GGMLQuantizationType.F16),
        "t2.q8": (rng.standard_normal((2, 64)).astype(np.float32), GGMLQuantizationType.Q8_0),
        "t3.q4": (rng.standard_normal((2, 64)).astype(np.float32), GGMLQuantizationType.Q4_0),
    }


TENSORS = _tensors()


def write_valid(path: Path, *, alignment: tuple[GGUFValueType, object] | None = None, data_alignment: int = ALIGN,
                endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    """The valid small file. `alignment` adds a raw general.alignment key (the data stays `data_alignment`-aligned);
    a `data_alignment` other than 32 is declared in the file."""
    w = gguf.GGUFWriter(path, "llama", endianess=endianess)
    w.add_name("corpus")
    if data_alignment != ALIGN:
        w.add_custom_alignment(data_alignment)
    for key, (vtype, value) in SCALARS.items():
        w.add_key_value(key, value, vtype)
    for key, (etype, values) in ARRAYS.items():
        w.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=etype)
    if alignment is not None:
        w.add_key_value("general.alignment", alignment[1], alignment[0])
    for name, (data, qtype) in TENSORS.items():
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build(**kw) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return write_valid(Path(d) / "f.gguf", **kw).read_bytes()


@functools.cache
def valid_bytes() -> bytes:
    return build()


@dataclass
class Layout:
    """Where things lie in a valid file: fields[name] = (offset, size); tensor data as absolute spans."""

    fields: dict[str, tuple[int, int]]
    header_end: int  # end of the last tensor info
    data_offset: int
    data: dict[str, tuple[int, int]]  # tensor name -> (absolute offset, nbytes)
    data_end: int  # end of the last tensor's bytes (trailing padding after it is not needed)

    def at(self, field: str) -> int:
        return self.fields[field][0]


def layout(buf: bytes) -> Layout:
    f: dict[str, tuple[int, int]] = {}
    pos = 0

    def take(name: str, fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        f[name] = (pos, size)
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += size
        return v

    def string(name: str) -> str:
        nonlocal pos
        n = take(f"{name}.len", "<Q")
        f[name] = (pos, n)
        pos += n
        return buf[pos - n : pos].decode()

    f["magic"] = (0, 4)
    pos = 4
    take("version", "<I")
    n_tensors = take("n_tensors", "<Q")
    n_kv = take("n_kv", "<Q")
    scalar_fmt = {
        GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
        GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
        GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
        GGUFValueType.FLOAT64: "<d",
    }
    for _ in range(n_kv):
        key_at = pos
        key = string("kv:?")
        f[f"kv:{key}.len"], f[f"kv:{key}.key"] = f.pop("kv:?.len"), f.pop("kv:?")
        vtype = GGUFValueType(take(f"kv:{key}.type", "<I"))
        if vtype == GGUFValueType.STRING:
            string(f"kv:{key}.str")
        elif vtype == GGUFValueType.ARRAY:
            etype = GGUFValueType(take(f"kv:{key}.etype", "<I"))
            count = take(f"kv:{key}.count", "<Q")
            for i in range(count):
                if etype == GGUFValueType.STRING:
                    string(f"kv:{key}[{i}]")
                else:
                    take(f"kv:{key}[{i}]", scalar_fmt[etype])
        else:
            take(f"kv:{key}.value", scalar_fmt[vtype])
        f[f"kv:{key}"] = (key_at, pos - key_at)
    infos = []
    for _ in range(n_tensors):
        info_at = pos
        name = string("ti:?")
        f[f"ti:{name}.len"], f[f"ti:{name}.name"] = f.pop("ti:?.len"), f.pop("ti:?")
        n_dims = take(f"ti:{name}.n_dims", "<I")
        ne = [take(f"ti:{name}.dim{d}", "<Q") for d in range(n_dims)]
        qtype = GGMLQuantizationType(take(f"ti:{name}.type", "<I"))
        rel = take(f"ti:{name}.offset", "<Q")
        f[f"ti:{name}"] = (info_at, pos - info_at)
        block, size = GGML_QUANT_SIZES[qtype]
        infos.append((name, rel, int(np.prod(ne)) // block * size))
    header_end = pos
    data_offset = -(-pos // ALIGN) * ALIGN
    data = {name: (data_offset + rel, nbytes) for name, rel, nbytes in infos}
    return Layout(f, header_end, data_offset, data, max(a + n for a, n in data.values()))


def patch(buf: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(buf)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def splice(buf: bytes, start: int, end: int, new: bytes) -> bytes:
    """Replace header bytes [start, end) and re-pad so the tensor data stays aligned after the header."""
    lay = layout(buf)
    header = buf[:start] + new + buf[end : lay.header_end]
    return header + bytes(-len(header) % ALIGN) + buf[lay.data_offset :]


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: str  # a fragment the error message must contain (the key, tensor or offset it names)


def malformed_cases() -> list[Case]:
    v = valid_bytes()
    lay = layout(v)
    at = lay.at
    cases: list[Case] = []

    def add(name: str, data: bytes, expect: str) -> None:
        cases.append(Case(name, data, expect))

    def pad_to(n: int) -> int:
        return -(-n // ALIGN) * ALIGN

    # -- the fixed header
    add("empty", b"", "empty")
    add("magic_truncated", v[:3], "magic")
    add("bad_magic", b"GGML" + v[4:], "magic b'GGML'")
    add("version_1", patch(v, 4, "<I", 1), "version 1")
    add("version_4", patch(v, 4, "<I", 4), "version 4")
    add("big_endian", build(endianess=gguf.GGUFEndian.BIG), "big-endian")
    add("truncated_in_version", v[:6], "version")
    add("truncated_in_tensor_count", v[:12], "tensor count")
    add("truncated_in_kv_count", v[:20], "metadata count")
    add("tensor_count_u64_max", patch(v, at("n_tensors"), "<Q", U64_MAX), f"tensor count {U64_MAX}")
    add("kv_count_u64_max", patch(v, at("n_kv"), "<Q", U64_MAX), f"metadata count {U64_MAX}")
    n_kv = struct.unpack_from("<Q", v, at("n_kv"))[0]
    add("kv_count_plus_one", patch(v, at("n_kv"), "<Q", n_kv + 1), "tensor")
    n_t = struct.unpack_from("<Q", v, at("n_tensors"))[0]
    add("tensor_count_plus_one", patch(v, at("n_tensors"), "<Q", n_t + 1), f"tensor #{n_t}")

    # -- metadata
    add("truncated_in_key", v[: at("kv:test.arr_u8.key") + 3], "metadata key #")
    add("truncated_in_value", v[: at("kv:test.f64.value") + 5], "'test.f64'")
    add("truncated_in_string_value", v[: at("kv:test.str.str") + 2], "'test.str'")
    add("truncated_in_array", v[: at("kv:test.arr_i32[1]") + 1], "'test.arr_i32'")
    add("truncated_in_string_array", v[: at("kv:test.arr_str[3]") + 1], "'test.arr_str'[3]")
    add("key_length_u64_max", patch(v, at("kv:test.u32.len"), "<Q", U64_MAX), f"length {U64_MAX}")
    add("key_length_past_eof", patch(v, at("kv:test.u32.len"), "<Q", 60000), "60000 bytes")
    add("empty_key", splice(v, at("kv:test.u8.len"), at("kv:test.u8.type"), struct.pack("<Q", 0)), "is empty")
    add("string_length_u64_max", patch(v, at("kv:test.str.str.len"), "<Q", U64_MAX), "'test.str'")
    add("string_length_past_eof", patch(v, at("kv:test.str.str.len"), "<Q", len(v)), f"needs {len(v)} bytes")
    add("string_array_count_u64_max", patch(v, at("kv:test.arr_str.count"), "<Q", U64_MAX), "'test.arr_str'")
    add("numeric_array_count_u64_max", patch(v, at("kv:test.arr_i32.count"), "<Q", U64_MAX), "'test.arr_i32'")
    add("numeric_array_count_past_eof", patch(v, at("kv:test.arr_f32.count"), "<Q", len(v)), "'test.arr_f32'")
    add("string_array_item_length_u64_max", patch(v, at("kv:test.arr_str[1].len"), "<Q", U64_MAX),
        "'test.arr_str'[1]")
    add("unknown_value_type", patch(v, at("kv:test.u16.type"), "<I", 13), "unknown value type 13")
    add("unknown_value_type_u32_max", patch(v, at("kv:test.u16.type"), "<I", U32_MAX), "'test.u16'")
    add("unknown_array_element_type", patch(v, at("kv:test.arr_i32.etype"), "<I", 99), "unknown value type 99")
    add("nested_array", patch(v, at("kv:test.arr_i32.etype"), "<I", GGUFValueType.ARRAY), "nested arrays")
    add("invalid_utf8_key", patch(v, at("kv:test.u32.key") + 1, "<B", 0xFF), "UTF-8")
    add("invalid_utf8_value", patch(v, at("kv:test.str.str"), "<B", 0xC3 ^ 0x40), "'test.str'")
    add("invalid_utf8_array_item", patch(v, at("kv:test.arr_str[3]") + 1, "<B", 0xFF), "'test.arr_str'[3]")
    i8_key = at("kv:test.i8.key")
    add("duplicate_key", v[:i8_key] + b"test.u8" + v[i8_key + 7 :], "duplicate metadata key 'test.u8'")
    for value, vtype, label in [(0, GGUFValueType.UINT32, "0"), (3, GGUFValueType.UINT32, "3"),
                                (32, GGUFValueType.UINT64, "uint64"), ("32", GGUFValueType.STRING, "string"),
                                (32.0, GGUFValueType.FLOAT32, "float")]:
        add(f"alignment_{label}", build(alignment=(vtype, value)), "general.alignment")

    # -- tensor infos
    add("truncated_in_tensor_name", v[: at("ti:t1.f16.name") + 2], "tensor #1 name")
    add("truncated_in_tensor_dims", v[: at("ti:t2.q8.dim1") + 4], "tensor t2.q8 dim 1")
    add("truncated_in_tensor_offset", v[: at("ti:t3.q4.offset") + 7], "tensor t3.q4 offset")
    add("tensor_name_length_u64_max", patch(v, at("ti:t0.f32.len"), "<Q", U64_MAX), "tensor #0 name")
    add("tensor_name_too_long", patch(v, at("ti:t0.f32.len"), "<Q", 64), "limit of 63")
    add("invalid_utf8_tensor_name", patch(v, at("ti:t1.f16.name"), "<B", 0x80), "tensor #1 name")
    t3 = at("ti:t3.q4.name")
    add("duplicate_tensor_name", v[:t3] + b"t2.q8" + v[t3 + 5 :], "duplicate tensor name 't2.q8'")
    add("n_dims_0", patch(v, at("ti:t0.f32.n_dims"), "<I", 0), "tensor t0.f32: n_dims 0")
    add("n_dims_5", patch(v, at("ti:t0.f32.n_dims"), "<I", 5), "tensor t0.f32: n_dims 5")
    add("zero_dim", patch(v, at("ti:t0.f32.dim1"), "<Q", 0), "tensor t0.f32: dim 1 is 0")
    add("dim_u64_max", patch(v, at("ti:t0.f32.dim0"), "<Q", U64_MAX), "tensor t0.f32: dim 0")
    ovf = patch(patch(v, at("ti:t0.f32.dim0"), "<Q", 2**62), at("ti:t0.f32.dim1"), "<Q", 2**62)
    add("dims_product_overflow", ovf, "tensor t0.f32: element count")
    add("unknown_ggml_type_removed_q4_2", patch(v, at("ti:t1.f16.type"), "<I", 4),
        "tensor t1.f16: unknown ggml type id 4")
    add("unknown_ggml_type_1000", patch(v, at("ti:t1.f16.type"), "<I", 1000), "unknown ggml type id 1000")
    add("unknown_ggml_type_u32_max", patch(v, at("ti:t1.f16.type"), "<I", U32_MAX),
        f"unknown ggml type id {U32_MAX}")
    add("first_dim_not_block_multiple", patch(v, at("ti:t2.q8.dim0"), "<Q", 48), "tensor t2.q8: first dim 48")

    # -- tensor placement
    rel = {name: off - lay.data_offset for name, (off, _) in lay.data.items()}
    add("misaligned_tensor_offset", patch(v, at("ti:t1.f16.offset"), "<Q", rel["t1.f16"] + 1),
        "tensor t1.f16: offset")
    add("tensor_offset_past_eof", patch(v, at("ti:t3.q4.offset"), "<Q", pad_to(len(v))), "tensor t3.q4")
    add("tensor_offset_u64_max", patch(v, at("ti:t3.q4.offset"), "<Q", U64_MAX + 1 - ALIGN), "tensor t3.q4")
    add("tensor_end_past_eof", patch(v, at("ti:t3.q4.offset"), "<Q", pad_to(len(v) - lay.data_offset) - ALIGN),
        "tensor t3.q4")
    add("overlapping_tensors_same_start", patch(v, at("ti:t1.f16.offset"), "<Q", rel["t0.f32"]), "overlaps")
    add("overlapping_tensors_inside", patch(v, at("ti:t1.f16.offset"), "<Q", rel["t0.f32"] + 64), "overlaps")
    add("truncated_in_padding", v[: lay.header_end + 1], "past end of file")
    add("truncated_at_data", v[: lay.data_offset], "past end of file")
    add("truncated_in_tensor_data", v[: lay.data["t2.q8"][0] + 10], "tensor t2.q8")
    add("truncated_in_last_tensor", v[: lay.data_end - 1], "tensor t3.q4")
    return cases
