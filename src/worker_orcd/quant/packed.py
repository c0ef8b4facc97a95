"""Weights repacked for the GPU kernels (kernels/triton_quant.py, triton_kquant.py, triton_moe.py), and back:
torch only.

Weights are repacked once from ggml blocks into 32-bit words plus a separate scale per 32-weight block,
never expanded. Each word holds a contiguous run of a block's elements, in an order within the word chosen
so that the decode GEMMs' float16 tiles come out in element order (so x is read as it is, in vector loads):

Q8_0: codes uint32 [N, K/4], scales f16 [N, K/32]. Word i (0..7) of a block holds elements 4i .. 4i+3, byte b
      holding element 4i + Q8_0_BYTE_ELEMENT[b]: bytes t and t + 2 become one float16 pair by one mask,
      elements 4i + 2t and 4i + 2t + 1. Byte -> float by bit-building: float(0x4B000000 | (b ^ 0x80))
      - (2^23 + 128), or float16 0x6400 | (b ^ 0x80) less 1152.
MXFP4: codes uint32 [N, K/8], exponents uint8 [N, K/32]. Word i (0..3) of a block holds elements 8i .. 8i+7:
      slot s (0..3) of 16-bit half h holds element 8i + 2s + h, its 3 magnitude bits at MAG_BIT[s] and its sign
      at SIGN_BIT[s]. One shift and mask (slots 0, 1; two shifts for 2, 3) puts a slot's two codes into the
      sign, exponent-low and top-mantissa bits of an f16 pair, the pair of neighbouring elements one register
      of a tensor-core operand holds: f16 value = E2M1 value * 2^-14 (subnormals give 0 and 0.5 exactly), and
      w = f16 * 2^14 * 2^(e-127), ggml's doubled table times 2^(e-128).
      Two exponent bytes differ from ggml: 0 scales by 0 (ggml: 2^-127) and 255 by 2^127 (ggml: 2^128);
      real weights use neither (OCP MX reserves 255 for NaN).

The nibble formats (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) keep their bits per weight too. Codes:
      uint32 [N, K/8], the low 4 bits of each code; in every run of 32 elements, nibble t of word i
      (0..3) is element 4t + i, so nibble position t lines up with the runs of 4 elements at 4t, 4t+1, ...
      high: the bits above the nibble, one field per code word (same index as codes): uint8 (Q5_*, bit t)
      or int16 (Q6_K, bits 2t..2t+1); none for the 4-bit formats.
      scales: the block's other bytes as they are: Q4_0/Q5_0 d f16 [N, K/32]; Q4_1/Q5_1 (d, m) f16
      [N, K/32*2]; Q4_K/Q5_K the first 16 bytes (d, dmin, 12 bytes of 6-bit scales and mins) as int32
      [N, K/256*4]; Q6_K the last 18 bytes (16 int8 sub-block scales, d) uint8 [N, K/256*18].
F32, F16, BF16: codes are the values in their own dtype [N, K] (no scales): multiplied as they are.

Row groups (MXFP4): the codes of `group` consecutive rows are stored block-interleaved, [rows/group, K/32,
group, words a block] in a tensor still shaped [rows, words]: one block of a tile of rows is one contiguous run
(group * 16 bytes) instead of `group` runs of 16 bytes. H200, reading the 20B's expert codes as the decode
kernels do (bench/gpu_access_pattern.py): 1.1-2.5 TB/s row by row, 4.0 TB/s tile-major. Row slices and
concatenations stay views and concats at multiples of `group`; a weight whose matrices' rows are not a
multiple of it keeps group 1 (row by row). WORKER_ORCD_ROW_GROUP=1 packs MXFP4 row by row;
WORKER_ORCD_Q8_ROW_GROUP=64 groups Q8_0 too (off: no faster on the H200 once scales are folded, NOTES session 7).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
from gguf import GGMLQuantizationType as T

from worker_orcd.quant._bytes import bits, f16

# MXFP4 slot s: magnitude bits at MAG_BIT[s]..+2 and sign at SIGN_BIT[s] of each 16-bit half
MXFP4_MAG_BIT = (0, 3, 10, 13)
MXFP4_SIGN_BIT = (6, 9, 7, 8)
# Q8_0 byte b of word i holds element 4i + Q8_0_BYTE_ELEMENT[b] (a permutation that is its own inverse)
Q8_0_BYTE_ELEMENT = (0, 2, 1, 3)


@dataclass(frozen=True)
class PackedWeight:
    """A repacked 2-D (or stacked [E, N, K]) weight: codes [rows, words], scales [rows, ...], the high bits
    of the 5- and 6-bit formats [rows, words] (all indexed by row first, as the module doc says)."""

    kind: str  # "q8_0" | "mxfp4" | a NIBBLE_FORMATS key | "f32" | "f16" | "bf16"
    codes: torch.Tensor
    scales: torch.Tensor
    n: int  # output features per matrix
    k: int  # input features
    high: torch.Tensor | None = None
    group: int = 1  # rows whose codes are block-interleaved (the module doc's row groups); 1: row by row
    fold: bool = False  # every block's scale times its codes fits float16 (fold_scales_fit): the decode GEMMs
    # may scale the float16 tile before the dot instead of the float32 result after it

    def _parts(self) -> list[torch.Tensor]:
        return [self.codes, self.scales] + ([] if self.high is None else [self.high])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._parts())

    def rows(self, start: int, stop: int, n: int | None = None) -> PackedWeight:
        """Rows [start, stop) as a weight of `n` output features (a view: one expert of a stacked weight)."""
        if start % self.group or stop % self.group:
            return self.row_by_row().rows(start, stop, n)
        return self._with(lambda t: t[start:stop], n or stop - start)

    def take(self, ids: torch.Tensor) -> PackedWeight:
        """The rows `ids` (a gather: embedding lookups), row by row."""
        if self.group == 1:
            return self._with(lambda t: t[ids], ids.numel())
        nblk = self.k // 32
        g = self.codes.reshape(-1, nblk, self.group, self.codes.shape[1] // nblk)  # [groups, blocks, group, words]
        codes = g[ids // self.group, :, ids % self.group].reshape(ids.numel(), -1)
        return PackedWeight(self.kind, codes, self.scales[ids], ids.numel(), self.k,
                            None if self.high is None else self.high[ids], fold=self.fold)

    def row_by_row(self) -> PackedWeight:
        """The same weight with group 1 (a copy when grouped)."""
        if self.group == 1:
            return self
        codes = group_rows(self.codes, self.group, self.k // 32, undo=True)
        return PackedWeight(self.kind, codes, self.scales, self.n, self.k, self.high, fold=self.fold)

    def _with(self, f, n: int) -> PackedWeight:
        return PackedWeight(self.kind, f(self.codes), f(self.scales), n, self.k,
                            None if self.high is None else f(self.high), self.group, self.fold)


def group_rows(codes: torch.Tensor, group: int, nblk: int, undo: bool = False) -> torch.Tensor:
    """Row-by-row codes [rows, words] -> row groups (the module doc): [rows/group, nblk, group, words a block];
    undo: back to row by row. Swapping the middle two axes is its own inverse."""
    rows = codes.shape[0]
    middle = (nblk, group) if undo else (group, nblk)
    return codes.reshape(rows // group, *middle, -1).transpose(1, 2).reshape(rows, -1).contiguous()


def cat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """One weight holding the rows of several of one kind and width (groups concatenate whole)."""
    if len({q.group for q in parts}) > 1 or any(q.codes.shape[0] % q.group for q in parts):
        parts = [q.row_by_row() for q in parts]
    p = parts[0]
    high = None if p.high is None else torch.cat([q.high for q in parts])
    return PackedWeight(p.kind, torch.cat([q.codes for q in parts]), torch.cat([q.scales for q in parts]),
                        sum(q.codes.shape[0] for q in parts), p.k, high, p.group, all(q.fold for q in parts))


# MXFP4 row groups: 64 rows (1 KB a block) divide the row counts of every supported model's MXFP4 matrices.
# Q8_0 takes the same layout (2 KB a block) with WORKER_ORCD_Q8_ROW_GROUP=64: every kernel reads it (tests in the
# interpreter); H200, session 7: +1-3% on the per-block tiles, nothing with folded scales, so it stays off.
MXFP4_GROUP = int(os.environ.get("WORKER_ORCD_ROW_GROUP", "64"))
Q8_0_GROUP = int(os.environ.get("WORKER_ORCD_Q8_ROW_GROUP", "1"))


# Scale folding: the decode GEMMs may multiply a block's float16 codes (MXFP4: E2M1 value * 2^-14; Q8_0: the int8
# value) by a float16 scale before the dot, one dot over several blocks, instead of scaling each block's float32
# dot. MXFP4 exponent bytes e in [104, 128] (and 0) keep that exact: the scale 2^(e-113) is a float16 normal and
# every product E2M1 * 2^(e-127) a float16 (subnormals from 2^-24). Q8_0 rounds q * d to float16 (as llama.cpp's
# float16 dequantization does); |d| <= 512 keeps 127 * d finite. Real checkpoints fit; a weight that does not
# keeps the per-block float32 scaling.
MXFP4_FOLD_E = (104, 128)
Q8_0_FOLD_D = 512.0


def fold_scales_fit(kind: str, scales: torch.Tensor) -> bool:
    """Whether every block of a weight with these scales (MXFP4 exponent bytes, Q8_0 float16 d) can be folded."""
    if scales.numel() == 0:
        return True
    if kind == "mxfp4":
        e = scales.to(torch.int32)
        return bool(((e == 0) | ((e >= MXFP4_FOLD_E[0]) & (e <= MXFP4_FOLD_E[1]))).all())
    if kind == "q8_0":
        return bool((scales.float().abs() <= Q8_0_FOLD_D).all())
    return False


def _group_for(group: int, n: int, rows: int) -> int:
    """`group` where every matrix's rows (n) are a multiple of it, else 1 (row by row)."""
    return group if group > 1 and n % group == 0 and rows % n == 0 else 1


def _words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, K] byte codes (already permuted) -> int32 [rows, K/4] little-endian words."""
    return codes.contiguous().view(torch.int32)


def _q8_0_bytes(q: torch.Tensor) -> torch.Tensor:
    """Q8_0 codes [..., 32] in element order <-> in packed byte order (Q8_0_BYTE_ELEMENT, its own inverse): byte
    2a + c of each word is element 2c + a. Views and a copy only: no index tensor (this runs inside CUDA graph
    captures, for embedding rows)."""
    return q.reshape(*q.shape[:-1], 8, 2, 2).transpose(-1, -2).reshape(q.shape)


def pack_q8_0(raw: torch.Tensor, n: int, k: int) -> PackedWeight:
    """Q8_0 blocks uint8 [rows, K/32*34] (rows = any multiple of n) -> PackedWeight on raw's device."""
    rows = raw.shape[0]
    b = raw.reshape(rows, k // 32, 34)
    d = f16(b[..., 0:2]).squeeze(-1).to(torch.float16)  # [rows, K/32]
    q = b[..., 2:34].reshape(rows, k // 32, 8, 4)[..., list(Q8_0_BYTE_ELEMENT)].reshape(rows, k)
    group = _group_for(Q8_0_GROUP, n, rows)
    words = group_rows(_words(q), group, k // 32) if group > 1 else _words(q)
    return PackedWeight("q8_0", words, d.contiguous(), n, k, group=group, fold=fold_scales_fit("q8_0", d))


def pack_mxfp4(raw: torch.Tensor, n: int, k: int, chunk_rows: int = 16384) -> PackedWeight:
    """MXFP4 blocks uint8 [rows, K/32*17] -> PackedWeight (code bits placed as the module doc says).

    Rows go through in chunks, so the int64 temporaries stay small next to the tensor itself.
    """
    rows = raw.shape[0]
    b = raw.reshape(rows, k // 32, 17)
    group = _group_for(MXFP4_GROUP, n, rows)
    chunk_rows -= chunk_rows % group
    words = torch.empty(rows, k // 8, dtype=torch.int32, device=raw.device)
    for r in range(0, rows, chunk_rows):
        w = _mxfp4_words(b[r : r + chunk_rows, :, 1:17]).reshape(-1, k // 8)
        words[r : r + chunk_rows] = group_rows(w, group, k // 32) if group > 1 else w
    e = b[..., 0].contiguous()
    return PackedWeight("mxfp4", words, e, n, k, group=group, fold=fold_scales_fit("mxfp4", e))


def unpack(p: PackedWeight, chunk_rows: int = 16384) -> torch.Tensor:
    """The ggml blocks uint8 [rows, K/32*block bytes] that `p` was packed from (bit for bit)."""
    if p.group > 1:
        return unpack(p.row_by_row(), chunk_rows)
    rows = p.codes.shape[0]
    nb = p.k // 32
    if p.kind in NIBBLE_FORMATS:
        return _unpack_nibbles(p)
    if p.kind in FLOAT_DTYPES:
        return p.codes.contiguous().view(torch.uint8).reshape(rows, -1)
    if p.kind == "q8_0":
        q = _q8_0_bytes(p.codes.contiguous().view(torch.uint8).reshape(rows, nb, 32))
        d = p.scales.contiguous().view(torch.uint8).reshape(rows, nb, 2)
        return torch.cat([d, q], dim=-1).reshape(rows, nb * 34)
    out = torch.empty(rows, nb, 17, dtype=torch.uint8, device=p.codes.device)
    out[..., 0] = p.scales
    for r in range(0, rows, chunk_rows):
        out[r : r + chunk_rows, :, 1:] = _mxfp4_nibbles(p.codes[r : r + chunk_rows].reshape(-1, nb, 4))
    return out.reshape(rows, nb * 17)


def _mxfp4_layout(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """elem [word i, slot s, half h] and the magnitude / sign bit positions [s, h] of the packed layout."""
    i, s, h = torch.arange(4, device=dev), torch.arange(4, device=dev), torch.arange(2, device=dev)
    elem = 8 * i[:, None, None] + 2 * s[None, :, None] + h[None, None, :]
    mag_at = torch.tensor(MXFP4_MAG_BIT, device=dev)[:, None] + 16 * h[None, :]
    sign_at = torch.tensor(MXFP4_SIGN_BIT, device=dev)[:, None] + 16 * h[None, :]
    return elem, mag_at, sign_at


def _mxfp4_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, nb, 4] words -> [rows, nb, 16] ggml nibble bytes (the inverse of _mxfp4_words)."""
    rows, nb, _ = words.shape
    elem, mag_at, sign_at = _mxfp4_layout(words.device)
    w = (words.to(torch.int64) & 0xFFFFFFFF)[..., :, None, None]  # [rows, nb, i, 1, 1]
    c = ((w >> mag_at) & 7) | (((w >> sign_at) & 1) << 3)  # [rows, nb, i, s, h]
    codes = torch.empty(rows, nb, 32, dtype=torch.int64, device=words.device)
    codes[..., elem.reshape(-1)] = c.reshape(rows, nb, -1)
    return (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)


def _mxfp4_words(qs: torch.Tensor) -> torch.Tensor:
    """qs [rows, nb, 16] (ggml nibbles) -> int32 [rows, nb, 4] words."""
    rows, nb, _ = qs.shape
    codes = torch.stack([qs & 0x0F, qs >> 4], dim=-2).reshape(rows, nb, 32).to(torch.int64)  # element order
    elem, mag_at, sign_at = _mxfp4_layout(qs.device)
    c = codes[..., elem]  # [rows, nb, word i, slot s, half h]
    words = (((c & 7) << mag_at) | ((c >> 3) << sign_at)).sum(dim=(-1, -2))  # disjoint bits: sum == or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@dataclass(frozen=True)
class NibbleFormat:
    """Where a nibble format's fields sit in its ggml block: byte ranges [start, stop). qs and qh are runs of
    L bytes; field f (bits [f*width, (f+1)*width)) of byte i of run r is element (r * F + f) * L + i of the
    block (F = 8 // width fields a byte). E.g. Q4_K's qs: runs of 32, low nibbles sub-block 2r, high 2r+1."""

    ggml_type: T
    block: int  # elements
    size: int  # bytes
    scales: tuple[int, int]
    scale_dtype: torch.dtype
    qs: tuple[int, int, int]  # start, stop, L
    qh: tuple[int, int, int] | None = None  # start, stop, L
    high_bits: int = 0  # width of qh's fields


NIBBLE_FORMATS = {
    "q4_0": NibbleFormat(T.Q4_0, 32, 18, (0, 2), torch.float16, (2, 18, 16)),
    "q4_1": NibbleFormat(T.Q4_1, 32, 20, (0, 4), torch.float16, (4, 20, 16)),
    "q5_0": NibbleFormat(T.Q5_0, 32, 22, (0, 2), torch.float16, (6, 22, 16), (2, 6, 1), 1),
    "q5_1": NibbleFormat(T.Q5_1, 32, 24, (0, 4), torch.float16, (8, 24, 16), (4, 8, 1), 1),
    "q4_k": NibbleFormat(T.Q4_K, 256, 144, (0, 16), torch.int32, (16, 144, 32)),
    "q5_k": NibbleFormat(T.Q5_K, 256, 176, (0, 16), torch.int32, (48, 176, 32), (16, 48, 32), 1),
    "q6_k": NibbleFormat(T.Q6_K, 256, 210, (192, 210), torch.uint8, (0, 128, 64), (128, 192, 32), 2),
}
FLOAT_KINDS = {T.F32: "f32", T.F16: "f16", T.BF16: "bf16"}
FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _elements(fields: torch.Tensor, run: int, width: int) -> torch.Tensor:
    """Bytes [rows, nb, bytes] (runs of `run` bytes) -> [rows, nb * elements] values in element order."""
    rows, nb, nbytes = fields.shape
    v = bits(fields.reshape(rows, nb, nbytes // run, run), width)  # [rows, nb, runs, F, run]
    return v.reshape(rows, -1)


def _fields(values: torch.Tensor, nb: int, run: int, width: int) -> torch.Tensor:
    """The inverse of _elements: [rows, nb * elements] -> bytes [rows, nb, bytes]."""
    rows = values.shape[0]
    v = values.reshape(rows, nb, -1, 8 // width, run)
    out = torch.zeros(rows, nb, v.shape[2], run, dtype=torch.uint8, device=values.device)
    for f in range(8 // width):
        out |= v[:, :, :, f] << (f * width)
    return out.reshape(rows, nb, -1)


def _per_word(values: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, K] fields of `width` bits in element order -> [rows, K/8, width] bytes: word i of each 32
    elements gets element 4t + i at bits [t*width, (t+1)*width) (little-endian across its bytes)."""
    rows, k = values.shape
    v = values.reshape(rows, k // 32, 8, 4).transpose(-1, -2)  # [rows, runs, i, t]
    v = v.reshape(rows, k // 32, 4, width, 8 // width)  # t = byte * (8 // width) + f
    out = torch.zeros(rows, k // 32, 4, width, dtype=torch.uint8, device=values.device)
    for f in range(8 // width):
        out |= v[..., f] << (f * width)
    return out.reshape(rows, k // 8, width)


def _from_words(words: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """The inverse of _per_word: [rows, K/8] words of any dtype with `width` bytes -> [rows, K] uint8."""
    rows = words.shape[0]
    b = words.contiguous().view(torch.uint8).reshape(rows, k // 32, 4, width, 1)
    f = torch.arange(0, 8, width, dtype=torch.uint8, device=words.device)
    v = (b >> f) & ((1 << width) - 1)  # [rows, runs, i, byte, f]
    return v.reshape(rows, k // 32, 4, 8).transpose(-1, -2).reshape(rows, k)


def pack_nibbles(kind: str, raw: torch.Tensor, n: int, k: int, chunk_rows: int = 16384) -> PackedWeight:
    """Blocks uint8 [rows, K/block*size] of a NIBBLE_FORMATS kind -> PackedWeight (the module doc's layout).

    Rows go through in chunks, so the byte-per-element temporaries stay small next to the tensor itself.
    """
    f = NIBBLE_FORMATS[kind]
    rows, nb = raw.shape[0], k // f.block
    b = raw.reshape(rows, nb, f.size)
    codes = torch.empty(rows, k // 8, dtype=torch.int32, device=raw.device)
    high = None if f.qh is None else torch.empty(rows, k // 8, dtype=(torch.uint8, torch.int16)[f.high_bits - 1],
                                                   device=raw.device)  # fmt: skip
    for r in range(0, rows, chunk_rows):
        c = b[r : r + chunk_rows]
        low = _elements(c[..., f.qs[0] : f.qs[1]], f.qs[2], 4)  # [chunk, K] 4-bit codes in element order
        codes[r : r + chunk_rows] = _per_word(low, 4).view(torch.int32)[..., 0]
        if high is not None:  # Q5_*: one byte a word (uint8), Q6_K: two (int16)
            hi = _per_word(_elements(c[..., f.qh[0] : f.qh[1]], f.qh[2], f.high_bits), f.high_bits)
            high[r : r + chunk_rows] = hi.view(high.dtype)[..., 0]
    scales = b[..., f.scales[0] : f.scales[1]].contiguous().view(f.scale_dtype).reshape(rows, -1)
    return PackedWeight(kind, codes, scales, n, k, high)


def _unpack_nibbles(p: PackedWeight) -> torch.Tensor:
    f = NIBBLE_FORMATS[p.kind]
    rows, nb = p.codes.shape[0], p.k // f.block
    out = torch.empty(rows, nb, f.size, dtype=torch.uint8, device=p.codes.device)
    out[..., f.scales[0] : f.scales[1]] = p.scales.contiguous().view(torch.uint8).reshape(rows, nb, -1)
    out[..., f.qs[0] : f.qs[1]] = _fields(_from_words(p.codes, 4, p.k), nb, f.qs[2], 4)
    if f.qh is not None:
        out[..., f.qh[0] : f.qh[1]] = _fields(_from_words(p.high, f.high_bits, p.k), nb, f.qh[2], f.high_bits)
    return out.reshape(rows, -1)


def pack_float(kind: str, raw: torch.Tensor, n: int, k: int) -> PackedWeight:
    """F32/F16/BF16 bytes -> the values in their own dtype [rows, K]: held once, multiplied as they are."""
    rows = raw.shape[0]
    values = raw.contiguous().view(FLOAT_DTYPES[kind]).reshape(rows, k)
    return PackedWeight(kind, values, values.new_empty(rows, 0), n, k)


PACKERS = {T.Q8_0: pack_q8_0, T.MXFP4: pack_mxfp4}
PACKERS |= {f.ggml_type: partial(pack_nibbles, kind) for kind, f in NIBBLE_FORMATS.items()}
PACKERS |= {t: partial(pack_float, kind) for t, kind in FLOAT_KINDS.items()}


def pack(raw: torch.Tensor, ggml_type: T, shape: tuple[int, ...]) -> PackedWeight | None:
    """The kernels' layout of a weight's blocks (rows = all leading dims); None for formats without a kernel."""
    packer = PACKERS.get(ggml_type)
    if packer is None or len(shape) < 2:
        return None
    return packer(raw, shape[-2], shape[-1])
