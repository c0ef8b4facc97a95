"""Fused dequantize + GEMM (Triton) for the nibble formats Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.

The weights stay in quant/packed.py's layouts, the ggml blocks' bits reordered (4.5 to 6.56 bits a weight):
    codes  uint32 [N, K/8]: in every run of 32 elements, nibble t of word i (0..3) is element 4t + i
    high   uint8 (Q5_*: bit t) or int16 (Q6_K: bits 2t..2t+1) [N, K/8]: the code bits above the nibble
    scales Q4_0/Q5_0 d f16 [N, K/32]; Q4_1/Q5_1 (d, m) f16 [N, K/32*2]; Q4_K/Q5_K the blocks' first 16
           bytes (d, dmin, 6-bit scales and mins) as int32 [N, K/256*4]; Q6_K their last 18 bytes
           (16 int8 scales, d) uint8 [N, K/256*18]
A weight's value is scale * (code - zero) + offset, per 32 elements (Q6_K: per 16):
    Q4_0 d (q - 8)    Q5_0 d (q - 16)    Q4_1/Q5_1 d q + m    Q4_K/Q5_K (d sc) q - dmin m    Q6_K (d s) (q - 32)

Decode batches (<= DECODE_MAX_M rows): one kernel, tiles of 16 rows of x and split-K fixed by the weight's
shape, so a row's result does not depend on the batch. A step is 32 words of a row (256 weights, one
super-block of the k-quants): the [BN, 32] tile of words is decoded once per nibble position t into bf16 and
multiplied by x's runs at 4t (tl.dot, float32 accumulation). Prompt chunks: the weight dequantized to bf16
once per call (an elementwise kernel) and cuBLAS.
The torch reference is `quant.dequantize` followed by a matmul (`tensor.dequantize_matmul`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.pdl import pdl_enter, pdl_launch
from worker_orcd.kernels.triton_quant import (
    DECODE_MAX_M,
    INTERPRET,
    cublas_into,
    matmul_operands,
    split_k,
    sum_partials_kernel,
)
from worker_orcd.quant.packed import NIBBLE_FORMATS, PackedWeight

# kind -> the kernel's constexprs: HIGH bits above the nibble, the code's ZERO point, MIN: an offset per block
FORMAT_ARGS = {
    "q4_0": {"HIGH": 0, "ZERO": 8, "MIN": False},
    "q4_1": {"HIGH": 0, "ZERO": 0, "MIN": True},
    "q5_0": {"HIGH": 1, "ZERO": 16, "MIN": False},
    "q5_1": {"HIGH": 1, "ZERO": 0, "MIN": True},
    "q4_k": {"HIGH": 0, "ZERO": 0, "MIN": True},
    "q5_k": {"HIGH": 1, "ZERO": 0, "MIN": True},
    "q6_k": {"HIGH": 2, "ZERO": 32, "MIN": False},
}
WS = 32  # words of a row per step: 256 weights (one k-quant super-block, 8 legacy blocks)


@triton.jit
def _f16_bits(b):
    """Low 16 bits of integers -> the float32 of that f16."""
    return (b & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_words(q_ptr, h_ptr, n, word, ok, nw, HIGH: tl.constexpr):
    """Code words and their high-bit fields [BN, WS] (uint32) of rows n, words `word` of each row."""
    off = n[:, None] * nw + word[None, :]
    q = tl.load(q_ptr + off, mask=ok, other=0).to(tl.uint32, bitcast=True)
    h = q
    if HIGH == 1:
        h = tl.load(h_ptr + off, mask=ok, other=0).to(tl.uint32)
    if HIGH == 2:
        h = tl.load(h_ptr + off, mask=ok, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    return q, h


@triton.jit
def _scales(s_ptr, n, w0, kk, ok, K, HALF: tl.constexpr, KIND: tl.constexpr):
    """(scale, offset) float32 [BN, WS] of words w0 + kk of rows n (offset: the MIN formats only; Q6_K: the
    sub-block of nibbles 0-3 for HALF 0, 4-7 for HALF 1). k-quant steps are one super-block (w0 % 32 == 0)."""
    word = w0 + kk
    if KIND == "q4_0" or KIND == "q5_0":
        scale = tl.load(s_ptr + n[:, None] * (K // 32) + (word // 4)[None, :], mask=ok, other=0.0).to(tl.float32)
        offset = scale
    elif KIND == "q4_1" or KIND == "q5_1":
        dm = s_ptr + (n[:, None] * (K // 32) + (word // 4)[None, :]) * 2
        scale = tl.load(dm, mask=ok, other=0.0).to(tl.float32)
        offset = tl.load(dm + 1, mask=ok, other=0.0).to(tl.float32)
    elif KIND == "q6_k":
        blk = s_ptr + (n * (K // 256) + w0 // 32) * 18  # [BN]: 16 int8 scales, then d
        s = tl.load(blk[:, None] + (2 * (kk // 4) + HALF)[None, :])  # sub-block 2g + HALF of run g = kk // 4
        d = _f16_bits(tl.load(blk + 16).to(tl.uint32) | (tl.load(blk + 17).to(tl.uint32) << 8))
        scale = d[:, None] * s.to(tl.int8, bitcast=True).to(tl.float32)
        offset = scale
    else:  # q4_k, q5_k: ggml's get_scale_min_k4 for sub-block j = kk // 4
        blk = s_ptr + (n * (K // 256) + w0 // 32) * 4  # [BN]: words d | dmin << 16, then the 12 bytes
        dd = tl.load(blk).to(tl.uint32, bitcast=True)[:, None]
        a = tl.load(blk + 1).to(tl.uint32, bitcast=True)[:, None]  # bytes 0-3: sc 0-3, top bits of sc 4-7
        b = tl.load(blk + 2).to(tl.uint32, bitcast=True)[:, None]  # bytes 4-7: m 0-3, top bits of m 4-7
        c = tl.load(blk + 3).to(tl.uint32, bitcast=True)[:, None]  # bytes 8-11: low bits of sc | m << 4, 4-7
        j = (kk // 4)[None, :]
        sh = (j % 4) * 8
        sc = tl.where(j < 4, (a >> sh) & 63, ((c >> sh) & 15) | (((a >> (sh + 6)) & 3) << 4))
        mn = tl.where(j < 4, (b >> sh) & 63, ((c >> (sh + 4)) & 15) | (((b >> (sh + 6)) & 3) << 4))
        scale = _f16_bits(dd) * sc.to(tl.float32)
        offset = -(_f16_bits(dd >> 16) * mn.to(tl.float32))
    return scale, offset


@triton.jit
def _values(q, h, scale, offset, t: tl.constexpr, HIGH: tl.constexpr, ZERO: tl.constexpr, MIN: tl.constexpr):
    """float32 [BN, WS] weights at nibble position t: scale * (code - ZERO) (+ offset)."""
    c = (q >> (4 * t)) & 0xF
    if HIGH == 1:
        c = c | (((h >> t) & 1) << 4)
    if HIGH == 2:
        c = c | (((h >> (2 * t)) & 3) << 4)
    code = (c | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO)  # 2^23 + c, exactly
    if MIN:
        return tl.fma(code, scale, offset)
    return code * scale


# row counts vary per step: not specialized on (a value first seen mid-serving would recompile for ~1 s)
@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
    x_ptr,
    q_ptr,
    h_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    CHUNK,
    KIND: tl.constexpr,
    HIGH: tl.constexpr,
    ZERO: tl.constexpr,
    MIN: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    WS: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """y[split] = x W^T over the split's CHUNK words of each row of W; per step of WS words, 8 dots
    [BM, WS] x [WS, BN], one per nibble position t, x read at the runs the words' nibbles t hold."""
    pdl_enter()
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    n_in = tl.minimum(n, N - 1)  # clamped: loads need no row mask, the store is masked
    m_in = tl.minimum(m, M - 1)
    nw = K // 8
    w_lo = split * CHUNK
    w_hi = tl.minimum(w_lo + CHUNK, nw)
    kk = tl.arange(0, WS)
    dot_t = tl.float32 if DOT_F32 else tl.bfloat16
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for w0 in range(w_lo, w_hi, WS):
        word = w0 + kk
        ok = (word < w_hi)[None, :]
        q, h = _load_words(q_ptr, h_ptr, n_in, word, ok, nw, HIGH)
        scale, offset = _scales(s_ptr, n_in, w0, kk, ok, K, 0, KIND)
        x_run = x_ptr + m_in[:, None] * stride_xm + (8 * (word - word % 4) + word % 4)[None, :]  # nibble 0
        for t in tl.static_range(8):
            if KIND == "q6_k":
                if t == 4:  # nibbles 4-7 are the second sub-block of 16
                    scale, offset = _scales(s_ptr, n_in, w0, kk, ok, K, 1, KIND)
            w = _values(q, h, scale, offset, t, HIGH, ZERO, MIN).to(dot_t)
            xt = tl.load(x_run + 4 * t, mask=ok, other=0.0).to(dot_t)
            acc = tl.dot(xt, tl.trans(w), acc)
    y = y_ptr + split * M * N + m[:, None] * N + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(m < M)[:, None] & (n < N)[None, :])


@triton.jit
def _dequant_kernel(
    q_ptr,
    h_ptr,
    s_ptr,
    out_ptr,
    N,
    K,
    KIND: tl.constexpr,
    HIGH: tl.constexpr,
    ZERO: tl.constexpr,
    MIN: tl.constexpr,
    BN: tl.constexpr,
    WS: tl.constexpr,
):
    """out [N, K] (any float type) = the weight's values: a program decodes one step of WS words of BN rows
    with the GEMM's own decoder and stores each nibble position's runs of 4."""
    pdl_enter()
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_in = tl.minimum(n, N - 1)
    w0 = tl.program_id(1) * WS
    kk = tl.arange(0, WS)
    word = w0 + kk
    nw = K // 8
    ok = (word < nw)[None, :]
    q, h = _load_words(q_ptr, h_ptr, n_in, word, ok, nw, HIGH)
    scale, offset = _scales(s_ptr, n_in, w0, kk, ok, K, 0, KIND)
    out = out_ptr + n.to(tl.int64)[:, None] * K + (8 * (word - word % 4) + word % 4)[None, :]
    for t in tl.static_range(8):
        if KIND == "q6_k":
            if t == 4:
                scale, offset = _scales(s_ptr, n_in, w0, kk, ok, K, 1, KIND)
        v = _values(q, h, scale, offset, t, HIGH, ZERO, MIN)
        tl.store(out + 4 * t, v.to(out_ptr.dtype.element_ty), mask=ok & (n < N)[:, None])


def _check(w: PackedWeight) -> None:
    if w.kind not in NIBBLE_FORMATS:
        raise ValueError(f"no nibble-format kernel for packed kind {w.kind}")


def dequantize_kquant(w: PackedWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The packed weight's values [rows, K] in `dtype` (one kernel; the prefill path's tensor-core operand)."""
    _check(w)
    rows = w.codes.shape[0]
    out = torch.empty(rows, w.k, dtype=dtype, device=w.codes.device)
    BN = 16 if INTERPRET else 32
    _dequant_kernel[(triton.cdiv(rows, BN), triton.cdiv(w.k // 8, WS))](
        w.codes, w.high if w.high is not None else w.codes, w.scales, out, rows, w.k, KIND=w.kind,
        **FORMAT_ARGS[w.kind], BN=BN, WS=WS, num_warps=1 if INTERPRET else 4, **pdl_launch(),
    )  # fmt: skip
    return out


def kquant_gemm_config(w: PackedWeight) -> dict:
    """Tiles for the decode GEMM: 16 rows of x, BN rows of W, split over K by the weight's shape alone.
    Not timed on a GPU yet (bench/gpu_tune.py kquant sweeps): chosen by registers (bench/kquant_compile.py,
    sm_90, Triton 3.6 and 3.9): BN=64 over 8 warps takes 64-169 and spills nothing; 4 warps need up to 252."""
    if INTERPRET:
        return {"BM": 16, "BN": 16, "TARGET": 1, "num_warps": 1, "num_stages": 1}
    return {"BM": 16, "BN": 64, "TARGET": 528, "num_warps": 8, "num_stages": 3}


def kquant_matmul(
    w: PackedWeight, x: torch.Tensor, cfg: dict | None = None, out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in out_dtype (default x.dtype; into `out`, contiguous [M, N], if given),
    W one packed 2-D weight of a nibble format. A cfg (kquant_gemm_config's keys) forces the GEMM."""
    _check(w)
    lead, x2, y = matmul_operands("kquant_matmul", w, x, out, out_dtype)
    M = x2.shape[0]
    if M == 0:
        return y.reshape(*lead, w.n)
    if cfg is None and M > DECODE_MAX_M and not INTERPRET:  # prompt chunks: dequantize once, cuBLAS
        return cublas_into(x2, dequantize_kquant(w, torch.bfloat16), y).reshape(*lead, w.n)
    c = dict(cfg or kquant_gemm_config(w))
    BM, BN, target = c.pop("BM"), c.pop("BN"), c.pop("TARGET", 1)
    tiles = triton.cdiv(w.n, BN)
    splits, chunk = split_k(w.k // 8, tiles, WS, target)  # in words, by shape, never by row count
    part = y if splits == 1 else torch.empty(splits, M, w.n, dtype=torch.float32, device=x.device)
    _gemm_kernel[(tiles, triton.cdiv(M, BM), splits)](
        x2, w.codes, w.high if w.high is not None else w.codes, w.scales, part, M, w.n, w.k, x2.stride(0), chunk,
        KIND=w.kind, **FORMAT_ARGS[w.kind], BM=BM, BN=BN, WS=WS, DOT_F32=INTERPRET, **c, **pdl_launch(),
    )  # fmt: skip
    if splits > 1:
        sum_partials_kernel[(1, triton.cdiv(M * w.n, 1024))](part, y, M * w.n, 0, M * w.n, R=splits, BJ=1024,
                                                              **pdl_launch())
    return y.reshape(*lead, w.n)
