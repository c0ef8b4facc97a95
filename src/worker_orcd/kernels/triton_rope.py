"""RoPE on CUDA (Triton): every head of every row rotated in one launch (kernels/rope.py has the reference).

out[j] = x[j] cos[j] + turned[j] sin[j] for j < n_rot, where turned pairs dim j with its partner: NEOX
(halves) j +- n_rot/2, NORM (adjacent) j +- 1, the first of each pair negated; dims past n_rot pass through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.triton_attention import INTERPRET


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, n_rot, HD: tl.constexpr,
                 NEOX: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    j = tl.arange(0, BD)
    ok = (h < heads)[:, None] & (j < HD)[None, :]
    rot = j < n_rot
    if NEOX:
        half = n_rot // 2
        first = j < half
        partner = tl.where(first, j + half, j - half)
    else:
        first = j % 2 == 0
        partner = tl.where(first, j + 1, j - 1)
    partner = tl.where(rot, partner, j)
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
        BH=BH, BD=triton.next_power_of_2(hd), num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    return out
