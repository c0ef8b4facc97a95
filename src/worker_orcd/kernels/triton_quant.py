"""Fused dequantize + GEMV/GEMM for Q8_0 and MXFP4 weights (Triton), with the repacked layouts they read.

Weights are repacked once into quant/packed.py's layouts (32-bit words plus a scale per 32-weight block).

The torch reference is `quant.dequantize` followed by a matmul (`tensor.dequantize_matmul`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker_orcd.kernels import cuda_dense
from worker_orcd.kernels.pdl import pdl_enter, pdl_launch
from worker_orcd.quant.packed import (  # noqa: F401  (re-exported: the kernels' layouts)
    MXFP4_MAG_BIT,
    MXFP4_SIGN_BIT,
    PackedWeight,
    pack_mxfp4,
    pack_q8_0,
    unpack,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
F16X2_ASM = tl.constexpr(not INTERPRET)  # inline PTX where it compiles; the interpreter takes the generic path



# ---------------------------------------------------------------- word decoders (shared by every kernel)


@triton.jit
def _q8_byte(w, t: tl.constexpr):
    """Byte t of uint32 words as the float of its int8 value."""
    b = ((w >> (8 * t)) & 0xFF) ^ 0x4B000080
    return b.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _mx_bits(w, s: tl.constexpr):
    """Slot s of uint32 words -> two float16 bit patterns in one word: E2M1 values * 2^-14 (low, high half)."""
    if s == 0:
        h = (w << 9) & 0x8E008E00
    elif s == 1:
        h = (w << 6) & 0x8E008E00
    elif s == 2:
        h = ((w >> 1) & 0x0E000E00) | ((w << 8) & 0x80008000)
    else:
        h = ((w >> 4) & 0x0E000E00) | ((w << 7) & 0x80008000)
    return h


@triton.jit
def _f16_halves(h):
    """uint32 words holding two float16 bit patterns -> (low half, high half) as float16: a register move."""
    if F16X2_ASM:
        lo, hi = tl.inline_asm_elementwise(
            "mov.b32 {$0, $1}, $2;", "=h,=h,r", [h], dtype=(tl.float16, tl.float16), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        lo = (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (h >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _mx_half_pair(w, s: tl.constexpr):
    """Slot s of uint32 words -> two float16 E2M1 values * 2^-14 (low half, high half): bits only, no convert."""
    return _f16_halves(_mx_bits(w, s))


@triton.jit
def _mx_pair(w, s: tl.constexpr):
    """Slot s of uint32 words -> two float32 E2M1 values * 2^-14 (low half, high half)."""
    h = _mx_bits(w, s)
    if F16X2_ASM:  # both halves straight into cvt.f32.f16 (the generic path adds a byte permute per pair)
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
            "=r,=r,r", [h], dtype=(tl.float32, tl.float32), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        lo = (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (h >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _e8m0(e):
    """Exponent bytes -> float32 2^(e-127) built from bits (0 for e = 0)."""
    return (tl.minimum(e.to(tl.int32), 254) << 23).to(tl.float32, bitcast=True)


# ---------------------------------------------------------------- float16 block tiles (the decode GEMMs' default)
# One 32-weight block of BN rows -> [BN, 32] float16 by bit moves alone (exact: int8 values, E2M1 values * 2^-14),
# in an order of K of the decoder's choosing; x is gathered in the same order, and the block's scale multiplies
# the float32 result of a K=32 dot. Cheaper than converting each value to float32, scaling it and rounding it
# to bfloat16, and x keeps 10 bits of mantissa instead of 7.


@triton.jit
def _q8_half_pair(w, t: tl.constexpr):
    """Bytes t and t + 2 of uint32 words -> their int8 values as two float16: 0x6400 | (byte ^ 0x80) is
    1024 + q + 128, less 1152."""
    lo, hi = _f16_halves(((w >> (8 * t)) & 0x00FF00FF) ^ 0x64806480)
    return lo - 1152.0, hi - 1152.0


@triton.jit
def _q8_0_block_f16(w):
    """8 packed words a row [BN, 8] -> [BN, 32] float16 int8 values in element order: column c = 4i + 2t + h holds
    byte t + 2h of word i, element c (quant/packed.py)."""
    w = w.to(tl.uint32, bitcast=True)
    l0, h0 = _q8_half_pair(w, 0)
    l1, h1 = _q8_half_pair(w, 1)
    return tl.reshape(tl.join(tl.join(l0, l1), tl.join(h0, h1)), [w.shape[0], 32])


@triton.jit
def _row_words(rows, nblk, WPB: tl.constexpr, GROUP: tl.constexpr):
    """Offset of block 0's first word of each row (quant/packed.py's row groups); block kb's words start
    kb * GROUP * WPB words later."""
    return ((rows // GROUP) * (nblk * GROUP) + rows % GROUP) * WPB


@triton.jit
def _block_dot_f16(x, w_ptr, s_ptr, rows, nblk, kb, kb_hi, IS_MXFP4: tl.constexpr, DOT_F32: tl.constexpr,
                   GROUP: tl.constexpr, W_LEFT: tl.constexpr = False):
    """x [BM, 32] float16 (from _x_blocks_f16) . block kb of W rows [BN] -> float32 [BM, BN], scaled; 0 past
    kb_hi. W_LEFT: the weights as the dot's left operand instead, [BN, BM] (on Hopper wgmma reads its left operand
    from registers, so the decoded tile need not pass through shared memory: docs/research/mxfp4-decode.md)."""
    WPB: tl.constexpr = 4 if IS_MXFP4 else 8  # words per block
    wi = tl.arange(0, WPB)
    ok = tl.full([rows.shape[0]], kb, tl.int32) < kb_hi  # masks as tensors: the interpreter takes no scalar
    w_row = _row_words(rows, nblk, WPB, GROUP)
    w = tl.load(w_ptr + w_row[:, None] + kb * (GROUP * WPB) + wi[None, :], mask=ok[:, None], other=0)
    if IS_MXFP4:
        t = _mxfp4_fold_f16(w)
        s = _e8m0(tl.load(s_ptr + rows * nblk + kb, mask=ok, other=0)) * 16384.0
    else:
        t = _q8_0_block_f16(w)
        s = tl.load(s_ptr + rows * nblk + kb, mask=ok, other=0.0).to(tl.float32)
    if W_LEFT:
        d = _dot_f16(x, t, tl.zeros([t.shape[0], x.shape[0]], tl.float32), DOT_F32, True) * s[:, None]
    else:
        d = _dot_f16(x, t, tl.zeros([x.shape[0], t.shape[0]], tl.float32), DOT_F32, False) * s[None, :]
    return d


@triton.jit
def _mxfp4_fold_f16(w):
    """4 packed words a row [R, 4] -> [R, 32] float16 (unscaled) in element order: column c = 8i + 4p + 2r + h holds
    word i, half h of slot r + 2p, element c (quant/packed.py). A word's two halves land side by side, the pair of
    K values one register of the dot's operand holds: no byte permutes to pair them."""
    w = w.to(tl.uint32, bitcast=True)
    l0, h0 = _mx_half_pair(w, 0)
    l1, h1 = _mx_half_pair(w, 1)
    l2, h2 = _mx_half_pair(w, 2)
    l3, h3 = _mx_half_pair(w, 3)
    lo = tl.join(tl.join(l0, l2), tl.join(l1, l3))  # [R, 4, p, r]
    hi = tl.join(tl.join(h0, h2), tl.join(h1, h3))
    return tl.reshape(tl.join(lo, hi), [w.shape[0], 32])


@triton.jit
def _x_blocks_f16(x_rows, ok_m, kb, kb_hi, NB: tl.constexpr):
    """Blocks kb .. kb + NB - 1 of x rows (pointers [BM], masked by ok_m; zeros past kb_hi), clamped to float16's
    range: float16 [BM, NB * 32]. Contiguous: the decoded tiles are in element order."""
    k = kb * 32 + tl.arange(0, NB * 32)
    x = tl.load(x_rows[:, None] + k[None, :], mask=ok_m[:, None] & (k < kb_hi * 32)[None, :], other=0.0)
    return _f16_saturated(x)


@triton.jit
def _f16_saturated(x):
    """x as float16, clamped to float16's finite range (one convert a pair on the GPU); float16 x as it is."""
    if x.dtype == tl.float16:
        return x
    if F16X2_ASM:
        return tl.inline_asm_elementwise("cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,r,r", [x.to(tl.float32)],
                                         dtype=tl.float16, is_pure=True, pack=2)  # fmt: skip
    return tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def _w_blocks_f16(w_ptr, s_ptr, rows, nblk, kb, kb_hi, NB: tl.constexpr, IS_MXFP4: tl.constexpr,
                  GROUP: tl.constexpr):
    """Blocks kb .. kb + NB - 1 of W rows [BN], each block's scale folded in (PackedWeight.fold: exact for MXFP4,
    Q8_0 rounded to float16): float16 [BN, NB * 32] in element order; 0 past kb_hi."""
    WPB: tl.constexpr = 4 if IS_MXFP4 else 8  # words per block
    BN: tl.constexpr = rows.shape[0]
    i = tl.arange(0, NB * WPB)
    ok = (kb + i // WPB < kb_hi)[None, :]
    w_row = _row_words(rows, nblk, WPB, GROUP)
    w = tl.load(w_ptr + w_row[:, None] + ((kb + i // WPB) * (GROUP * WPB) + i % WPB)[None, :], mask=ok, other=0)
    j = tl.arange(0, NB)
    ok_s = (kb + j < kb_hi)[None, :]
    s = tl.load(s_ptr + rows[:, None] * nblk + kb + j[None, :], mask=ok_s, other=0)  # [BN, NB]
    if IS_MXFP4:  # 2^(e-113) as float16 bits: E2M1 * 2^-14 * 2^(e-113) = E2M1 * 2^(e-127); e = 0 gives 0
        e = s.to(tl.int32)
        s = tl.where(e == 0, 0, (e - 98) << 10).to(tl.int16).to(tl.float16, bitcast=True)
        t = _mxfp4_fold_f16(tl.reshape(w, [BN * NB, WPB]))
    else:
        t = _q8_0_block_f16(tl.reshape(w, [BN * NB, WPB]))
    t = tl.reshape(t, [BN * NB, 32]) * tl.reshape(s, [BN * NB])[:, None].to(tl.float16)
    return tl.reshape(t, [BN, NB * 32])


@triton.jit
def _dot_f16_blocks(x_rows, ok_m, w_ptr, s_ptr, w2_ptr, s2_ptr, rows, nblk, kb_lo, kb_hi, BM: tl.constexpr,
                    BN: tl.constexpr, NB: tl.constexpr, TWO: tl.constexpr, IS_MXFP4: tl.constexpr,
                    DOT_F32: tl.constexpr, GROUP: tl.constexpr, W_LEFT: tl.constexpr, FOLD: tl.constexpr = False):
    """x rows (pointers [BM], masked by ok_m) . W rows [BN] (and W2's, on the same x) over blocks [kb_lo, kb_hi),
    NB blocks a step, one _block_dot_f16 a block -> float32 [BM, BN] twice (W_LEFT: transposed once at the end).
    FOLD: the scales folded into the float16 weights (_w_blocks_f16), one dot over the step's NB blocks."""
    acc = tl.zeros([BN, BM] if W_LEFT else [BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BN, BM] if W_LEFT else [BM, BN], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi, NB):
        if FOLD:
            x = _x_blocks_f16(x_rows, ok_m, kb, kb_hi, NB)
            acc = _dot_f16(x, _w_blocks_f16(w_ptr, s_ptr, rows, nblk, kb, kb_hi, NB, IS_MXFP4, GROUP), acc,
                           DOT_F32, W_LEFT)  # fmt: skip
            if TWO:
                acc2 = _dot_f16(x, _w_blocks_f16(w2_ptr, s2_ptr, rows, nblk, kb, kb_hi, NB, IS_MXFP4, GROUP), acc2,
                                DOT_F32, W_LEFT)  # fmt: skip
        else:
            for b in tl.static_range(NB):
                x = _x_blocks_f16(x_rows, ok_m, kb + b, kb_hi, 1)
                acc += _block_dot_f16(x, w_ptr, s_ptr, rows, nblk, kb + b, kb_hi, IS_MXFP4, DOT_F32, GROUP, W_LEFT)
                if TWO:
                    acc2 += _block_dot_f16(x, w2_ptr, s2_ptr, rows, nblk, kb + b, kb_hi, IS_MXFP4, DOT_F32, GROUP,
                                           W_LEFT)  # fmt: skip
    if W_LEFT:
        acc, acc2 = tl.trans(acc), tl.trans(acc2)
    return acc, acc2


@triton.jit
def _dot_f16(x, t, acc, DOT_F32: tl.constexpr, W_LEFT: tl.constexpr):
    """acc + x [BM, K] . t [BN, K]^T (W_LEFT: acc^T + t . x^T), float16 operands (float32 in the interpreter)."""
    if DOT_F32:  # the interpreter's half-precision dots are unreliable
        x, t = x.to(tl.float32), t.to(tl.float32)
    if W_LEFT:
        acc = tl.dot(t, tl.trans(x), acc, input_precision="ieee" if DOT_F32 else None)
    else:
        acc = tl.dot(x, tl.trans(t), acc, input_precision="ieee" if DOT_F32 else None)
    return acc


# ---------------------------------------------------------------- GEMV tiles: acc[n] = x . W[n], one row of x
# Blocks [kb_lo, kb_hi) of K (split-K programs take a slice); EVEN: the slice is whole steps of NB blocks.
# STAGES >= 1: Triton pipelines the K loop (loads in flight through shared memory); 0: a register double
# buffer. Sums are reduced after the loop.


@triton.jit
def _x_slices(xb, ok):
    """x for one step, xb [NB, 4] the start of each word's run of 8 elements: the 8 slices [NB, 4], slice j
    element j of each run (still in x's dtype). One contiguous load, split."""
    NB: tl.constexpr = xb.shape[0]
    x = tl.load(xb[:, :, None] + tl.arange(0, 8)[None, None, :], mask=ok[:, None, None], other=0.0)
    c0, c1 = tl.split(tl.reshape(x, [NB, 4, 2, 2, 2]))  # element j = 4a + 2b + c at [.., a, b, c]
    c0b0, c0b1 = tl.split(c0)
    c1b0, c1b1 = tl.split(c1)
    x0, x4 = tl.split(c0b0)
    x2, x6 = tl.split(c0b1)
    x1, x5 = tl.split(c1b0)
    x3, x7 = tl.split(c1b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _f(v):
    return v.to(tl.float32)[None, :, :]


@triton.jit
def _mx_step(w, e, x0, x1, x2, x3, x4, x5, x6, x7, acc):
    """acc [BN, NB, 4] += scale * (decoded words w . x) for one step; x slices as _x_slices gives them (slot s, half
    h of a word: element 2s + h of its run)."""
    w = w.to(tl.uint32, bitcast=True)
    lo, hi = _mx_pair(w, 0)
    part = lo * _f(x0) + hi * _f(x1)
    lo, hi = _mx_pair(w, 1)
    part = tl.fma(hi, _f(x3), tl.fma(lo, _f(x2), part))
    lo, hi = _mx_pair(w, 2)
    part = tl.fma(hi, _f(x5), tl.fma(lo, _f(x4), part))
    lo, hi = _mx_pair(w, 3)
    part = tl.fma(hi, _f(x7), tl.fma(lo, _f(x6), part))
    return tl.fma(part, _e8m0(e)[:, :, None], acc)


@triton.jit
def _mxfp4_gemv_tile(
    x_ptr,
    w_ptr,
    e_ptr,
    w2_ptr,
    e2_ptr,
    n,
    K,
    kb_lo,
    kb_hi,
    BN: tl.constexpr,
    NB: tl.constexpr,
    EVEN: tl.constexpr,
    STAGES: tl.constexpr,
    TWO: tl.constexpr,
    GROUP: tl.constexpr = 1,
):
    """x [K] (any float type), W rows n [BN] (in bounds) -> float32 [BN]; TWO: also W2 rows n on the same x."""
    nblk = K // 32
    b = tl.arange(0, NB)
    i = tl.arange(0, 4)
    GW: tl.constexpr = GROUP * 4  # words from one block of a row to the next
    # multiples of 4 words: the compiler sees 16-byte alignment and issues one vector load per block
    w_off = (_row_words(n, nblk, 4, GROUP)[:, None] + b[None, :] * GW)[:, :, None] + i[None, None, :]  # [BN, NB, 4]
    e_off = n[:, None] * nblk + b[None, :]  # [BN, NB]
    x_blk = x_ptr + b[:, None] * 32 + 8 * i[None, :]  # [NB, 4]: word i holds elements 8i .. 8i + 7
    acc = tl.zeros([BN, NB, 4], dtype=tl.float32)
    acc2 = tl.zeros([BN, NB, 4], dtype=tl.float32)
    if STAGES == 0:  # register double buffer: step kb+NB's weights and x are in flight while step kb is decoded
        ok0 = (kb_lo + b < kb_hi) | EVEN
        w_n = tl.load(w_ptr + w_off + kb_lo * GW, mask=ok0[None, :, None], other=0)
        e_n = tl.load(e_ptr + e_off + kb_lo, mask=ok0[None, :], other=0)
        if TWO:
            w2_n = tl.load(w2_ptr + w_off + kb_lo * GW, mask=ok0[None, :, None], other=0)
            e2_n = tl.load(e2_ptr + e_off + kb_lo, mask=ok0[None, :], other=0)
        x0n, x1n, x2n, x3n, x4n, x5n, x6n, x7n = _x_slices(x_blk + kb_lo * 32, ok0)
    for kb in tl.range(kb_lo, kb_hi, NB, num_stages=max(STAGES, 1)):
        if STAGES == 0:
            w, e = w_n, e_n
            x0, x1, x2, x3, x4, x5, x6, x7 = x0n, x1n, x2n, x3n, x4n, x5n, x6n, x7n
            okn = kb + NB + b < kb_hi
            w_n = tl.load(w_ptr + w_off + (kb + NB) * GW, mask=okn[None, :, None], other=0)
            e_n = tl.load(e_ptr + e_off + kb + NB, mask=okn[None, :], other=0)
            if TWO:
                w2, e2 = w2_n, e2_n
                w2_n = tl.load(w2_ptr + w_off + (kb + NB) * GW, mask=okn[None, :, None], other=0)
                e2_n = tl.load(e2_ptr + e_off + kb + NB, mask=okn[None, :], other=0)
            x0n, x1n, x2n, x3n, x4n, x5n, x6n, x7n = _x_slices(x_blk + (kb + NB) * 32, okn)
        else:
            ok = (kb + b < kb_hi) | EVEN
            w = tl.load(w_ptr + w_off + kb * GW, mask=ok[None, :, None], other=0)
            e = tl.load(e_ptr + e_off + kb, mask=ok[None, :], other=0)
            if TWO:
                w2 = tl.load(w2_ptr + w_off + kb * GW, mask=ok[None, :, None], other=0)
                e2 = tl.load(e2_ptr + e_off + kb, mask=ok[None, :], other=0)
            x0, x1, x2, x3, x4, x5, x6, x7 = _x_slices(x_blk + kb * 32, ok)
        acc = _mx_step(w, e, x0, x1, x2, x3, x4, x5, x6, x7, acc)
        if TWO:
            acc2 = _mx_step(w2, e2, x0, x1, x2, x3, x4, x5, x6, x7, acc2)
    y = tl.sum(tl.sum(acc, axis=2), axis=1) * 16384.0
    if TWO:
        return y, tl.sum(tl.sum(acc2, axis=2), axis=1) * 16384.0
    return y, y


@triton.jit
def _q8_0_gemv_tile(
    x_ptr,
    w_ptr,
    d_ptr,
    n,
    K,
    kb_lo,
    kb_hi,
    BN: tl.constexpr,
    NB: tl.constexpr,
    EVEN: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP: tl.constexpr = 1,
):
    nblk = K // 32
    b = tl.arange(0, NB)
    i = tl.arange(0, 8)
    GW: tl.constexpr = GROUP * 8
    w_off = (_row_words(n, nblk, 8, GROUP)[:, None] + b[None, :] * GW)[:, :, None] + i[None, None, :]  # [BN, NB, 8]
    d_off = n[:, None] * nblk + b[None, :]
    x_blk = x_ptr + b[:, None] * 32 + 4 * i[None, :]  # [NB, 8]: word i holds elements 4i .. 4i + 3
    acc = tl.zeros([BN, NB, 8], dtype=tl.float32)
    if STAGES == 0:  # register double buffer, as in the MXFP4 tile
        ok0 = (kb_lo + b < kb_hi) | EVEN
        w_n = tl.load(w_ptr + w_off + kb_lo * GW, mask=ok0[None, :, None], other=0)
        d_n = tl.load(d_ptr + d_off + kb_lo, mask=ok0[None, :], other=0.0)
    for kb in tl.range(kb_lo, kb_hi, NB, num_stages=max(STAGES, 1)):
        ok = (kb + b < kb_hi) | EVEN
        if STAGES == 0:
            w, d = w_n.to(tl.uint32, bitcast=True), d_n.to(tl.float32)
            okn = kb + NB + b < kb_hi
            w_n = tl.load(w_ptr + w_off + (kb + NB) * GW, mask=okn[None, :, None], other=0)
            d_n = tl.load(d_ptr + d_off + kb + NB, mask=okn[None, :], other=0.0)
        else:
            w = tl.load(w_ptr + w_off + kb * GW, mask=ok[None, :, None], other=0).to(tl.uint32, bitcast=True)
            d = tl.load(d_ptr + d_off + kb, mask=ok[None, :], other=0.0).to(tl.float32)
        xb = x_blk + kb * 32
        x = tl.load(xb[:, :, None] + tl.arange(0, 4)[None, None, :], mask=ok[:, None, None], other=0.0)
        e0, e1 = tl.split(tl.reshape(x, [NB, 8, 2, 2]))  # element j = 2a + c of a word's run at [.., a, c]
        x0, x2 = tl.split(e0)
        x1, x3 = tl.split(e1)
        part = _q8_byte(w, 0) * _f(x0)  # byte b holds element Q8_0_BYTE_ELEMENT[b]: 0, 2, 1, 3
        part = tl.fma(_q8_byte(w, 1), _f(x2), part)
        part = tl.fma(_q8_byte(w, 2), _f(x1), part)
        part = tl.fma(_q8_byte(w, 3), _f(x3), part)
        acc = tl.fma(part, d[:, :, None], acc)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


# row counts vary per step: not specialized on (a value first seen mid-serving would recompile for ~1 s)
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    CHUNK,
    IS_MXFP4: tl.constexpr,
    BN: tl.constexpr,
    NB: tl.constexpr,
    EVEN: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP: tl.constexpr = 1,
):
    """y[split, m, n] = x[m] . W[n] over the split's CHUNK blocks of K (one split: the whole row).

    Rows m of x are the fastest grid axis, so their programs run together and share the tile through L2.
    """
    pdl_enter()
    m = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_in = tl.minimum(n, N - 1)  # clamped: loads need no mask, the store is masked
    split = tl.program_id(2)
    kb_lo = split * CHUNK
    kb_hi = tl.minimum(kb_lo + CHUNK, K // 32)
    x = x_ptr + m * stride_xm
    if IS_MXFP4:
        acc, _ = _mxfp4_gemv_tile(x, w_ptr, s_ptr, w_ptr, s_ptr, n_in, K, kb_lo, kb_hi, BN, NB, EVEN, STAGES, False,
                                  GROUP)  # fmt: skip
    else:
        acc = _q8_0_gemv_tile(x, w_ptr, s_ptr, n_in, K, kb_lo, kb_hi, BN, NB, EVEN, STAGES, GROUP)
    tl.store(y_ptr + (split * M + m) * N + n, acc.to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit(do_not_specialize=["J", "stride_i", "stride_r", "N"])
def sum_partials_kernel(part_ptr, y_ptr, J, stride_i, stride_r, R: tl.constexpr, BJ: tl.constexpr, b_ptr=None,
                        N=1, HAS_BIAS: tl.constexpr = False):
    """y[i, j] = sum over r < R, in order, of part[i * stride_i + r * stride_r + j] (+ b[j % N], the bias of
    column j of a flat [M, N] output, added once in float32); stored in y's dtype."""
    pdl_enter()
    i = tl.program_id(0)
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    acc = tl.zeros([BJ], dtype=tl.float32)
    for r in tl.static_range(R):
        acc += tl.load(part_ptr + i * stride_i + r * stride_r + j, mask=j < J, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + j % N, mask=j < J, other=0.0).to(tl.float32)
    tl.store(y_ptr + i * J + j, acc.to(y_ptr.dtype.element_ty), mask=j < J)


@dataclass(frozen=True)
class Partials:
    """A split-K result not yet summed: y[t, d] = sum over r < R, in order, of part[t * stride_t + r * stride_r + d]
    (+ bias[d]), float32. Its consumer adds the sums in its own launch (triton_norm's add_rms_norm) instead of a
    launch of their own; `dense()` sums them where none does."""

    part: torch.Tensor
    rows: int
    cols: int
    R: int
    stride_t: int
    stride_r: int
    bias: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32  # what the matmul would have returned: its sums rounded to this

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        y = torch.empty(self.rows, self.cols, dtype=dtype or self.dtype, device=self.part.device)
        sum_partials_kernel[(self.rows, triton.cdiv(self.cols, 1024))](
            self.part, y, self.cols, self.stride_t, self.stride_r, R=self.R, BJ=1024, b_ptr=self.bias, N=self.cols,
            HAS_BIAS=self.bias is not None, **pdl_launch(),
        )  # fmt: skip
        return y


def split_k(nblk: int, tiles: int, nb: int, target: int) -> tuple[int, int]:
    """(splits, blocks per split): enough programs to reach `target`, each split whole steps of nb blocks."""
    steps = -(-nblk // nb)
    splits = max(1, min(-(-target // max(tiles, 1)), steps // 2 or 1, 8))
    chunk = -(-steps // splits) * nb
    return -(-nblk // chunk), chunk


# ---------------------------------------------------------------- GEMM tiles (prefill): dequantized tiles -> tl.dot


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    CHUNK,
    IS_MXFP4: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    NB: tl.constexpr,
    DOT_F32: tl.constexpr,
    F16: tl.constexpr = False,
    GROUP: tl.constexpr = 1,
    W_LEFT: tl.constexpr = False,
    FOLD: tl.constexpr = False,
    M_FIRST: tl.constexpr = False,
):
    """y[split] = x W^T over the split's CHUNK blocks of K (one split: the whole row); per step, one
    [BM, NB*words] x [NB*words, BN] dot for each value position in a word (F16: one float16 dot a block).
    M_FIRST: the grid's first axis is the row tiles, so the tiles reading one weight tile run side by side."""
    pdl_enter()
    m = tl.program_id(0 if M_FIRST else 1) * BM + tl.arange(0, BM)
    n = tl.program_id(1 if M_FIRST else 0) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    n_in = tl.minimum(n, N - 1)
    m_in = tl.minimum(m, M - 1)
    nblk = K // 32
    kb_lo = split * CHUNK
    kb_hi = tl.minimum(kb_lo + CHUNK, nblk)
    dot_t = tl.float32 if DOT_F32 else tl.bfloat16
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if F16:
        acc, _ = _dot_f16_blocks(x_ptr + m_in * stride_xm, m < M, w_ptr, s_ptr, w_ptr, s_ptr, n_in, nblk, kb_lo, kb_hi,
                                 BM, BN, NB, False, IS_MXFP4, DOT_F32, GROUP, W_LEFT, FOLD)  # fmt: skip
    else:
        WPB: tl.constexpr = 4 if IS_MXFP4 else 8  # words per block
        kk = tl.arange(0, NB * WPB)  # within a step: block kk // WPB, word kk % WPB
        blk_of = kk // WPB
        word_of = kk % WPB
        for kb in range(kb_lo, kb_hi, NB):
            blk = kb + blk_of  # [NB*WPB]
            ok = (blk < kb_hi)[None, :]
            w_row = _row_words(n_in, nblk, WPB, GROUP)
            w = tl.load(w_ptr + w_row[:, None] + (blk * (GROUP * WPB) + word_of)[None, :], mask=ok, other=0)
            w = w.to(tl.uint32, bitcast=True)
            s = tl.load(s_ptr + n_in[:, None] * nblk + blk[None, :], mask=ok, other=0)  # [BN, NB*WPB], repeated
            # word w of a block holds elements (32 // WPB) * w onwards (quant/packed.py)
            x_base = x_ptr + m_in[:, None] * stride_xm + (blk * 32 + (32 // WPB) * word_of)[None, :]  # [BM, NB*WPB]
            if IS_MXFP4:
                s = _e8m0(s) * 16384.0
                for p in tl.static_range(4):
                    lo, hi = _mx_pair(w, p)
                    xa = tl.load(x_base + 2 * p, mask=ok, other=0.0).to(dot_t)  # slot p: elements 2p, 2p + 1
                    xb = tl.load(x_base + 2 * p + 1, mask=ok, other=0.0).to(dot_t)
                    acc = tl.dot(xa, tl.trans((lo * s).to(dot_t)), acc)
                    acc = tl.dot(xb, tl.trans((hi * s).to(dot_t)), acc)
            else:
                s = s.to(tl.float32)
                for t in tl.static_range(4):
                    xa = tl.load(x_base + 2 * (t % 2) + t // 2, mask=ok, other=0.0).to(dot_t)  # byte t
                    acc = tl.dot(xa, tl.trans((_q8_byte(w, t) * s).to(dot_t)), acc)
    y = y_ptr + split * M * N + m[:, None] * stride_ym + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(m < M)[:, None] & (n < N)[None, :])


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, K, IS_MXFP4: tl.constexpr, BC: tl.constexpr, GROUP: tl.constexpr = 1):
    """out[r, c] (any float type) = the packed weight's value at row r, column c: one element per lane,
    stores contiguous (the words are re-read from L1 by the lanes that share them)."""
    pdl_enter()
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = c < K
    nblk = K // 32
    blk = c // 32
    e = c % 32
    if IS_MXFP4:  # element 8i + 2s + h: word i, slot s, half h (quant/packed.py)
        at = _row_words(r, nblk, 4, GROUP) + blk * (GROUP * 4) + e // 8
        word = tl.load(w_ptr + at, mask=ok, other=0).to(tl.uint32, bitcast=True)
        slot = (e % 8) // 2
        half = (word >> (16 * (e % 2))) & 0xFFFF
        mag_at = tl.where(slot == 0, 0, tl.where(slot == 1, 3, tl.where(slot == 2, 10, 13)))
        sign_at = tl.where(slot == 0, 6, tl.where(slot == 1, 9, tl.where(slot == 2, 7, 8)))
        mag = (half >> mag_at) & 7
        ex = (mag >> 1).to(tl.int32)
        frac = (mag & 1).to(tl.float32)
        v = tl.where(ex == 0, 0.5 * frac, tl.math.exp2((ex - 1).to(tl.float32)) * (1.0 + 0.5 * frac))
        v = tl.where(((half >> sign_at) & 1) == 1, -v, v)
        v = v * _e8m0(tl.load(s_ptr + r * nblk + blk, mask=ok, other=0))
    else:  # element 4i + Q8_0_BYTE_ELEMENT[b]: byte b of word i
        at = _row_words(r, nblk, 8, GROUP) + blk * (GROUP * 8) + e // 4
        word = tl.load(w_ptr + at, mask=ok, other=0).to(tl.uint32, bitcast=True)
        byte = ((word >> (8 * (2 * (e % 2) + (e % 4) // 2))) & 0xFF).to(tl.int32)
        v = tl.where(byte >= 128, byte - 256, byte).to(tl.float32)
        v = v * tl.load(s_ptr + r * nblk + blk, mask=ok, other=0).to(tl.float32)
    tl.store(out_ptr + r * K + c, v.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_packed(w: PackedWeight, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The packed weight's values [rows, K] in `dtype` (one kernel; the prefill path's tensor-core operand)."""
    rows = w.codes.shape[0]
    out = torch.empty(rows, w.k, dtype=dtype, device=w.codes.device) if out is None else out
    BC = 128 if INTERPRET else 1024
    _dequant_kernel[(rows, triton.cdiv(w.k, BC))](
        w.codes, w.scales, out, w.k, IS_MXFP4=_is_mxfp4(w), BC=BC, GROUP=w.group, num_warps=1 if INTERPRET else 4,
        **pdl_launch())
    return out


# ---------------------------------------------------------------- launchers


def _is_mxfp4(w: PackedWeight) -> bool:
    if w.kind not in ("q8_0", "mxfp4"):
        raise ValueError(f"no Triton kernel for packed kind {w.kind}")
    return w.kind == "mxfp4"


def gemv_config(w: PackedWeight) -> dict:
    """Block sizes for the GEMV (H100 sweeps in bench/gpu_kernels.py): small row tiles and split-K so even
    2880-row matrices fill 132 SMs; register double buffering, except Triton's pipeliner for big Q8_0."""
    if INTERPRET:
        return {"BN": 16, "NB": 2, "STAGES": 0, "TARGET": 1, "num_warps": 1}
    big_q8 = w.kind == "q8_0" and w.n > 8192
    return {
        "BN": 16 if w.n <= 8192 or w.kind == "mxfp4" else 32,
        "NB": 8 if w.kind == "mxfp4" else 4,
        "STAGES": 3 if big_q8 else 0,
        "TARGET": 1024,
        "num_warps": 4,
    }


def gemm_config(w: PackedWeight, m: int) -> dict:
    """Tiles for tl.dot: 16 rows of x for decode-sized batches (one weight read serves them all), split over K
    by the weight's shape alone; 128 rows for prefill."""
    if INTERPRET:
        return {"BM": 16, "BN": 16, "NB": 4, "TARGET": 1, "num_warps": 1, "num_stages": 1, "F16": F16_TILES,
                "W_LEFT": W_LEFT, "FOLD": FOLD}
    if m <= DECODE_MAX_M:  # H200 sweep (bench/gpu_tune.py): best of 36 configs on the 20B's q|k|v, o and head
        # (NB blocks a step: tl.dot needs K >= 16 values per dot, i.e. 2 Q8_0 or 4 MXFP4 blocks)
        # float16 tiles (sweep of session 6, us at M=1/16/64): Q8_0 5120x2880 NB=1 14.9/17.5/47.6 (NB=2 16.3),
        # 2880x4096 17.3/19.1/41.3 either; the 201088x2880 head NB=2 309/380/1384 (NB=1 342)
        # scales folded (FOLD, session 7, us at M=1/16/64): 5120x2880 NB=2 14.2/17.6/39.4 (NB=4 15.2/18.1/43.1),
        # 2880x4096 NB=4 12.8/16.9/34.9 (NB=2 14.4/17.3/39.2), the head NB=4 234/360/1407 (NB=2 298/382/1298)
        if F16_TILES and FOLD and w.fold:
            nb = 4 if w.n > 8192 or w.k >= 4096 else 2
        else:
            nb = (1 if w.n <= 8192 else 2) if F16_TILES else 2
        return {"BM": 16, "BN": 128, "NB": nb if w.kind == "q8_0" else 4, "TARGET": 528, "num_warps": 4,
                "num_stages": 3, "F16": F16_TILES, "W_LEFT": W_LEFT, "FOLD": FOLD, "M_FIRST": M_FIRST}
    return {"BM": 128, "BN": 128, "NB": 4, "TARGET": 1, "num_warps": 8, "num_stages": 3}


# Decode GEMMs (dense and MoE) on float16 block tiles (_block_dot_f16); WORKER_ORCD_F16_TILES=0 takes the
# bfloat16 tiles (each value converted to float32, scaled and rounded to bfloat16 before the dot) instead.
F16_TILES = os.environ.get("WORKER_ORCD_F16_TILES", "1") == "1"
# The float16 tiles' dots with the weights as the left operand (tokens as N): what OpenAI's triton_kernels do on
# Hopper (docs/research/mxfp4-decode.md). H200, session 7: no faster in any config (NOTES), so it stays off.
W_LEFT = os.environ.get("WORKER_ORCD_W_LEFT", "0") == "1"
# The float16 tiles with each block's scale folded into the weights before the dot (PackedWeight.fold), one dot
# over NB blocks instead of a K=32 dot and a float32 rescale per block (triton_kernels' Hopper path applies its
# MXFP4 scales the same way). H200 (bench/gpu_tune.py fold): dense 4-21% faster at one row, MoE 5-14% at every
# row count. WORKER_ORCD_FOLD=0 keeps the per-block scaling; weights whose scales do not fit always keep it.
FOLD = os.environ.get("WORKER_ORCD_FOLD", "1") == "1"
# The dense decode GEMMs' grid with the row tiles first, so the tiles of rows that read one weight tile run side by
# side and share its reads in L2 (launch order only: every row's sums are the same bits). H200 (bench/gpu_tune.py
# rows, session 8): the head at 64 rows 1,362 -> 1,191 us, at 256 5,400 -> 4,404; the small matrices (which fit
# in L2 anyway) the same; decode at 64 streams 4,472 -> 4,539 tok/s. The MoE tiles the same way: no change (their
# tiles of pairs mostly hold different experts). WORKER_ORCD_M_FIRST=0 launches N tiles first.
M_FIRST = os.environ.get("WORKER_ORCD_M_FIRST", "1") == "1"

# Up to this many rows (every decode batch the scheduler runs) one kernel, one tile shape and one split of K
# per weight shape: a row's result never depends on how many rows share the call. Above (prompt chunks):
# the weight dequantized to bf16 once per call and a cuBLAS GEMM.
DECODE_MAX_M = 128
# The CUDA-core GEMV reads a weight at up to 65% of the bandwidth for one row but decodes it again for every
# row (H200, Q8_0 2880x4096: 10.6 us at M=1, 73 at 16, 275 at 64); the tl.dot GEMM decodes once for 16 rows
# (31, 32, 86 us). Batch invariance needs one kernel for every row count, so the GEMM is the default;
# WORKER_ORCD_NONDETERMINISTIC=1 (serve --nondeterministic) takes the GEMV for one or two rows, faster for
# a lone stream, at the price of results that change with the batch. (A CUDA-core kernel decoding once for
# 2-8 rows was slower than both at every M: register-bound.)
GEMV_ROWS = 2 if os.environ.get("WORKER_ORCD_NONDETERMINISTIC") == "1" else 0


def matmul_operands(name: str, w: PackedWeight, x: torch.Tensor, out: torch.Tensor | None,
                    out_dtype: torch.dtype | None) -> tuple[torch.Size, torch.Tensor, torch.Tensor]:
    """(x's leading dims, x as [M, K] with unit stride along K, the output [M, N]: `out`, checked, or new)."""
    if x.shape[-1] != w.k:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, weight has {w.k}")
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, dtype = x2.shape[0], out_dtype or x.dtype
    y = torch.empty(M, w.n, dtype=dtype, device=x.device) if out is None else out
    if y.shape != (M, w.n) or y.dtype != dtype or not y.is_contiguous():
        raise ValueError(f"{name}: out must be contiguous {dtype} [{M}, {w.n}], got {y.dtype} {list(y.shape)}")
    return x.shape[:-1], x2, y


def cublas_into(x2: torch.Tensor, wd: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = x2 @ wd^T on bf16 operands (prompt chunks: the weight dequantized once for the call)."""
    xb = x2.to(torch.bfloat16)
    if y.dtype == torch.bfloat16:
        return torch.matmul(xb, wd.T, out=y)
    return y.copy_(torch.matmul(xb, wd.T))


def quant_matmul(
    w: PackedWeight, x: torch.Tensor, cfg: dict | None = None, out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None, partials: bool = False,
) -> torch.Tensor | Partials:
    """x [..., K] @ W^T (+ bias [N]) -> [..., N] in out_dtype (default x.dtype; into `out`, contiguous [M, N], if
    given), W one packed 2-D weight. A cfg picks its kernel by its keys (gemv_config's or gemm_config's). The
    bias joins the split-K sum in float32 when the kernel splits K (no launch of its own), else is added after.
    partials (x 2-D): a split K is returned as its Partials, for the consumer to sum."""
    lead, x2, y = matmul_operands("quant_matmul", w, x, out, out_dtype)
    M = x2.shape[0]
    if M == 0:
        return y.reshape(*lead, w.n)
    mx = _is_mxfp4(w)
    if cfg is None and M > DECODE_MAX_M and not INTERPRET:
        return _add_bias(cublas_into(x2, dequantize_packed(w, torch.bfloat16), y), bias).reshape(*lead, w.n)
    if cfg is None and cuda_dense.usable(w, x2, y):  # CUDA: the mma kernel, batch-invariant as the tiles
        return cuda_dense.q8_matmul(w, x2, y, bias).reshape(*lead, w.n)
    kind = "gemv" if (cfg is None and M <= GEMV_ROWS) or (cfg is not None and "BM" not in cfg) else "gemm"
    nblk = w.k // 32
    if kind == "gemv":
        c = dict(cfg or gemv_config(w))
        BN, NB, stages, target = c.pop("BN"), c.pop("NB"), c.pop("STAGES"), c.pop("TARGET")
        tiles = triton.cdiv(w.n, BN)
        splits, chunk = split_k(nblk, tiles, NB, target)  # by shape, never by row count
        part = y if splits == 1 else torch.empty(splits, M, w.n, dtype=torch.float32, device=x.device)
        _gemv_kernel[(M, tiles, splits)](
            x2, w.codes, w.scales, part, M, w.n, w.k, x2.stride(0), chunk, IS_MXFP4=mx, BN=BN, NB=NB,
            EVEN=nblk % chunk == 0, STAGES=stages, GROUP=w.group, **c, **pdl_launch(),
        )  # fmt: skip
    else:
        c = dict(cfg or gemm_config(w, M))
        BM, BN, NB, target = c.pop("BM"), c.pop("BN"), c.pop("NB"), c.pop("TARGET", 1)
        f16, w_left, fold = c.pop("F16", False), c.pop("W_LEFT", False), c.pop("FOLD", False) and w.fold
        m_first = c.pop("M_FIRST", False)
        tiles = triton.cdiv(w.n, BN)
        splits, chunk = split_k(nblk, triton.cdiv(w.n, c.pop("SPLIT_BN", BN)), NB, target)
        part = y if splits == 1 else torch.empty(splits, M, w.n, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(M, BM), tiles, splits) if m_first else (tiles, triton.cdiv(M, BM), splits)
        _gemm_kernel[grid](
            x2, w.codes, w.scales, part, M, w.n, w.k, x2.stride(0), w.n, chunk, IS_MXFP4=mx, BM=BM, BN=BN, NB=NB,
            DOT_F32=INTERPRET, F16=f16, GROUP=w.group, W_LEFT=w_left, FOLD=f16 and fold, M_FIRST=m_first, **c,
            **pdl_launch(),
        )  # fmt: skip
    if splits > 1 and partials and len(lead) == 1:
        return Partials(part, M, w.n, splits, w.n, M * w.n, bias, y.dtype)
    if splits > 1:
        sum_partials_kernel[(1, triton.cdiv(M * w.n, 1024))](part, y, M * w.n, 0, M * w.n, R=splits, BJ=1024,
                                                              b_ptr=bias, N=w.n, HAS_BIAS=bias is not None,
                                                              **pdl_launch())
        return y.reshape(*lead, w.n)
    return _add_bias(y, bias).reshape(*lead, w.n)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias)
