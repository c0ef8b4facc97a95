"""RMSNorm on CUDA (Triton), alone or fused with the residual add before it.

The residual stream stays float32; the normalized rows come out in bf16, the dtype the matmuls take, so a
norm is one launch instead of a handful of elementwise ops and a cast. The torch reference is
kernels/norm.py's `rms_norm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.triton_attention import INTERPRET


@triton.jit
def _rms_norm_kernel(x_ptr, y_ptr, w_ptr, out_ptr, res_ptr, D, eps, HAS_Y: tl.constexpr, BD: tl.constexpr):
    """out[t] = (x[t] (+ y[t])) / rms * w; with y, the sum is also stored to res[t] (the new residual)."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    ok = d < D
    x = tl.load(x_ptr + t * D + d, mask=ok, other=0.0).to(tl.float32)
    if HAS_Y:
        x += tl.load(y_ptr + t * D + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(res_ptr + t * D + d, x, mask=ok)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + d, (x * inv * w).to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res = torch.empty(x2.shape, dtype=torch.float32, device=x.device) if y is not None else out
    y2 = y.reshape(-1, D).contiguous() if y is not None else x2
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, y2, weight, out, res, D, eps, HAS_Y=y is not None,
                                         BD=triton.next_power_of_2(D), num_warps=1 if INTERPRET else 4)
    return out.reshape(x.shape), res.reshape(x.shape)


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype = torch.bfloat16
                  ) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in out_dtype."""
    return _launch(x, None, weight, eps, out_dtype)[0]


def add_rms_norm_cuda(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                      out_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y in float32, rms_norm(x + y) in out_dtype) in one launch."""
    out, res = _launch(x, y, weight, eps, out_dtype)
    return res, out
