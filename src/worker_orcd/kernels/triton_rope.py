"""RoPE on CUDA (Triton): every head of every row rotated in one launch (kernels/rope.py has the reference).

out[j] = x[j] cos[j] + turned[j] sin[j] for j < n_rot, where turned pairs dim j with its partner: NEOX
(halves) j +- n_rot/2, NORM (adjacent) j +- 1, the first of each pair negated; dims past n_rot pass through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.pdl import pdl_enter, pdl_launch
from worker_orcd.kernels.triton_attention import INTERPRET
from worker_orcd.kernels.triton_quant import Partials


@triton.jit
def _pairs(j, n_rot, NEOX: tl.constexpr):
    """(is the first of its pair, its partner) for dims j: NEOX pairs j with j +- n_rot/2, NORM with j +- 1;
    dims past n_rot are their own partner."""
    if NEOX:
        first = j < n_rot // 2
        partner = tl.where(first, j + n_rot // 2, j - n_rot // 2)
    else:
        first = j % 2 == 0
        partner = tl.where(first, j + 1, j - 1)
    return first, tl.where(j < n_rot, partner, j)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, n_rot, HD: tl.constexpr,
                 NEOX: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    j = tl.arange(0, BD)
    ok = (h < heads)[:, None] & (j < HD)[None, :]
    rot = j < n_rot
    first, partner = _pairs(j, n_rot, NEOX)
    row = x_ptr + t * stride_xt + h[:, None] * stride_xh
    x = tl.load(row + j[None, :], mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(row + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * n_rot + j, mask=rot, other=1.0)
    s = tl.load(sin_ptr + t * n_rot + j, mask=rot, other=0.0)
    turned = tl.where(first, -xp, xp)
    y = tl.where(rot[None, :], x * c[None, :] + turned * s[None, :], x)
    tl.store(out_ptr + t * heads * HD + h[:, None] * HD + j[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def apply_rope_cuda(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, neox: bool) -> torch.Tensor:
    """x [T, heads, head_dim] (any strides in T and heads) rotated by cos/sin [T, n_rot] float32: a new
    contiguous tensor in x.dtype."""
    T, heads, hd = x.shape
    out = torch.empty(T, heads, hd, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    BH = 4 if INTERPRET else 16
    _rope_kernel[(T, triton.cdiv(heads, BH))](
        x, cos.contiguous(), sin.contiguous(), out, heads, x.stride(0), x.stride(1), n_rot, HD=hd, NEOX=neox,
        BH=BH, BD=triton.next_power_of_2(hd), num_warps=1 if INTERPRET else 4, **pdl_launch(),
    )  # fmt: skip
    return out


@triton.jit
def _summed(row, col, ok, b_ptr, stride_r, R: tl.constexpr, HAS_B: tl.constexpr, dtype: tl.constexpr):
    """A matmul row's R split-K partial sums at columns col, added in order in float32, plus the bias, rounded to
    dtype: what sum_partials_kernel stores for the row, read back as float32."""
    acc = tl.zeros(col.shape, dtype=tl.float32)
    for r in tl.static_range(R):
        acc += tl.load(row + r * stride_r + col, mask=ok, other=0.0)
    if HAS_B:
        acc += tl.load(b_ptr + col, mask=ok, other=0.0).to(tl.float32)
    return acc.to(dtype).to(tl.float32)


@triton.jit
def _rope_store_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, blocks_ptr, offsets_ptr, H, HKV, stride_xt,
                       stride_b, stride_h, stride_o, n_rot, b_ptr, stride_r, HD: tl.constexpr, NEOX: tl.constexpr,
                       BH: tl.constexpr, BD: tl.constexpr, R: tl.constexpr = 0, HAS_B: tl.constexpr = False):
    """Row t of q|k|v [T, H + 2 HKV, HD]: q heads rotated into q [T, H, HD], k heads rotated and v heads as they
    are into the KV pools [blocks, HKV, block_size, HD] at (blocks[t], offsets[t]). R > 0: q|k|v is the matmul's
    R split-K partial sums (Partials: row t at x + t * stride_xt, split r stride_r further) and its bias, summed
    here as sum_partials_kernel would have (the same bits, one launch less)."""
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    j = tl.arange(0, BD)
    ok = (h < H + 2 * HKV)[:, None] & (j < HD)[None, :]
    rot = (j < n_rot)[None, :] & (h < H + HKV)[:, None]  # v heads pass through
    first, partner = _pairs(j, n_rot, NEOX)
    slot = tl.load(blocks_ptr + t) * stride_b + tl.load(offsets_ptr + t) * stride_o  # loaded before any store
    row = x_ptr + t * stride_xt
    if R > 0:
        x = _summed(row, h[:, None] * HD + j[None, :], ok, b_ptr, stride_r, R, HAS_B, q_ptr.dtype.element_ty)
        xp = _summed(row, h[:, None] * HD + partner[None, :], ok, b_ptr, stride_r, R, HAS_B, q_ptr.dtype.element_ty)
    else:
        x = tl.load(row + h[:, None] * HD + j[None, :], mask=ok, other=0.0).to(tl.float32)
        xp = tl.load(row + h[:, None] * HD + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * n_rot + j, mask=j < n_rot, other=1.0)
    s = tl.load(sin_ptr + t * n_rot + j, mask=j < n_rot, other=0.0)
    turned = tl.where(first[None, :], -xp, xp)
    y = tl.where(rot, x * c[None, :] + turned * s[None, :], x)
    tl.store(q_ptr + t * H * HD + h[:, None] * HD + j[None, :], y.to(q_ptr.dtype.element_ty),
             mask=ok & (h < H)[:, None])
    kh = h - H
    tl.store(k_ptr + slot + kh[:, None] * stride_h + j[None, :], y.to(k_ptr.dtype.element_ty),
             mask=ok & ((h >= H) & (h < H + HKV))[:, None])
    vh = h - H - HKV
    tl.store(v_ptr + slot + vh[:, None] * stride_h + j[None, :], y.to(v_ptr.dtype.element_ty),
             mask=ok & (h >= H + HKV)[:, None])


def rope_qkv_store(qkv: torch.Tensor | Partials, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, neox: bool,
                   n_heads: int, k_pool: torch.Tensor, v_pool: torch.Tensor, blocks: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor:
    """qkv [T, H + 2 Hkv, hd] (or a q|k|v matmul's Partials, [T, (H + 2 Hkv) hd], summed here) -> q rotated
    [T, H, hd] (qkv's dtype); k rotated and v stored in place into the pools [blocks, Hkv, block_size, hd] at row
    t's (blocks[t], offsets[t]). One launch for what apply_rope plus KVCache.write_rows do in three or more."""
    split = isinstance(qkv, Partials)
    hd = k_pool.shape[-1]
    T, heads = (qkv.rows, qkv.cols // hd) if split else qkv.shape[:2]
    n_kv = (heads - n_heads) // 2
    if (heads != n_heads + 2 * n_kv or k_pool.shape[1] != n_kv or v_pool.shape != k_pool.shape
            or (qkv.cols if split else qkv.shape[2] * heads) != heads * hd):
        shape = [qkv.rows, qkv.cols] if split else list(qkv.shape)
        raise ValueError(f"rope_qkv_store: q|k|v {shape} with {n_heads} q heads, pools {list(k_pool.shape)} / "
                         f"{list(v_pool.shape)}")
    q = torch.empty(T, n_heads, hd, dtype=qkv.dtype, device=k_pool.device)
    if T == 0:
        return q
    if split:
        x, stride_xt, stride_r, R, bias = qkv.part, qkv.stride_t, qkv.stride_r, qkv.R, qkv.bias
    else:
        x = qkv if qkv.stride(-1) == 1 and qkv.stride(1) == hd else qkv.contiguous()
        stride_xt, stride_r, R, bias = x.stride(0), 0, 0, None
    BH = 4 if INTERPRET else 16
    _rope_store_kernel[(T, triton.cdiv(heads, BH))](
        x, cos.contiguous(), sin.contiguous(), q, k_pool, v_pool, blocks, offsets, n_heads, n_kv, stride_xt,
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), n_rot, x if bias is None else bias, stride_r, HD=hd,
        NEOX=neox, BH=BH, BD=triton.next_power_of_2(hd), R=R, HAS_B=bias is not None,
        num_warps=1 if INTERPRET else 4, **pdl_launch(),
    )  # fmt: skip
    return q
