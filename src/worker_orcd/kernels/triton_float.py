"""x @ W^T for float matrices (F32, F16, BF16) held in their own dtype, for decode-sized batches (Triton).

cuBLAS picks its kernel by the row count (a GEMV for one row, split-K GEMMs for a few), so a row's bits change
with the batch; measured on an H200 for BF16 and F16 2880 x 4096. This kernel's tiles and its split of K
depend on the weight's shape alone, as the quantized kernels' do (kernels/triton_quant.py), so a row gets the
same bits alone and among 128. Operands: F16 and BF16 weights in their dtype with x cast to it (llama.cpp's
cuBLAS path casts x to F16 too); F32 weights as TF32. Accumulation in float32, split-K partials summed in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.pdl import pdl_enter, pdl_launch
from worker_orcd.kernels.triton_quant import INTERPRET, matmul_operands, split_k, sum_partials_kernel
from worker_orcd.quant.packed import FLOAT_DTYPES, PackedWeight


@triton.jit(do_not_specialize=["M"])
def _float_gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    CHUNK,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    W_F32: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """y[split] = x W^T over the split's CHUNK columns of K (one split: the whole row)."""
    pdl_enter()
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    split = tl.program_id(2)
    n_in = tl.minimum(n, N - 1)  # clamped: loads need no row mask, the store is masked
    m_in = tl.minimum(m, M - 1)
    k_lo = split * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K)
    kk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        ok = (k0 + kk < k_hi)[None, :]
        x = tl.load(x_ptr + m_in[:, None] * stride_xm + (k0 + kk)[None, :], mask=ok, other=0.0)
        w = tl.load(w_ptr + n_in[:, None] * stride_wn + (k0 + kk)[None, :], mask=ok, other=0.0)  # [BN, BK]
        if DOT_F32:  # the interpreter's bf16 dot is wrong; float32 there
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        elif W_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="tf32")
        else:
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
    y = y_ptr + split * M * N + m[:, None] * N + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(m < M)[:, None] & (n < N)[None, :])


def float_gemm_config(w: PackedWeight) -> dict:
    """16 rows of x a tile, K split by the weight's shape alone."""
    if INTERPRET:
        return {"BM": 16, "BN": 16, "BK": 32, "TARGET": 1, "num_warps": 1, "num_stages": 1}
    return {"BM": 16, "BN": 64, "BK": 64 if w.kind == "f32" else 128, "TARGET": 528, "num_warps": 4, "num_stages": 3}


def float_matmul(
    w: PackedWeight,
    x: torch.Tensor,
    cfg: dict | None = None,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias [N]) -> [..., N] in out_dtype (default x.dtype), W a 2-D float matrix."""
    if w.kind not in FLOAT_DTYPES:
        raise ValueError(f"float_matmul: {w.kind} is not a float matrix")
    lead, x2, y = matmul_operands("float_matmul", w, x, None, out_dtype)
    M = x2.shape[0]
    if M == 0:
        return y.reshape(*lead, w.n)
    c = dict(cfg or float_gemm_config(w))
    BM, BN, BK, target = c.pop("BM"), c.pop("BN"), c.pop("BK"), c.pop("TARGET")
    tiles = triton.cdiv(w.n, BN)
    splits, chunk = split_k(triton.cdiv(w.k, BK), tiles, 1, target)  # in steps of BK, never by row count
    part = y if splits == 1 else torch.empty(splits, M, w.n, dtype=torch.float32, device=x.device)
    _float_gemm_kernel[(tiles, triton.cdiv(M, BM), splits)](
        x2, w.codes, part, M, w.n, w.k, x2.stride(0), w.codes.stride(0), chunk * BK, BM=BM, BN=BN, BK=BK,
        W_F32=w.kind == "f32", DOT_F32=INTERPRET, **c, **pdl_launch(),
    )  # fmt: skip
    if splits > 1:
        sum_partials_kernel[(1, triton.cdiv(M * w.n, 1024))](
            part, y, M * w.n, 0, M * w.n, R=splits, BJ=1024, b_ptr=bias, N=w.n, HAS_BIAS=bias is not None,
            **pdl_launch()
        )
    elif bias is not None:
        y.add_(bias)
    return y.reshape(*lead, w.n)
