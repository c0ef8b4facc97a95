"""RMSNorm on CUDA (Triton), alone or fused with the residual add before it.

The residual stream stays float32; the normalized rows come out in bf16, the dtype the matmuls take (or float16,
saturated, which the folded decode GEMMs read as it is), so a norm is one launch instead of a handful of
elementwise ops and a cast. The torch reference is
kernels/norm.py's `rms_norm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.pdl import pdl_enter, pdl_launch
from worker_orcd.kernels.triton_attention import INTERPRET
from worker_orcd.kernels.triton_quant import Partials


@triton.jit
def _rms_norm_kernel(x_ptr, y_ptr, w_ptr, out_ptr, res_ptr, D, eps, stride_t, stride_r, b_ptr, HAS_Y: tl.constexpr,
                     BD: tl.constexpr, R: tl.constexpr = 0, HAS_B: tl.constexpr = False):
    """out[t] = (x[t] (+ y[t])) / rms * w; with y, the sum is also stored to res[t] (the new residual). R > 0: y is
    R split-K partial sums (Partials), added in order in float32, then the bias."""
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    ok = d < D
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)  # first: its latency hides behind the row's loads
    x = tl.load(x_ptr + t * D + d, mask=ok, other=0.0).to(tl.float32)
    if HAS_Y:
        if R > 0:
            y = tl.zeros([BD], dtype=tl.float32)
            for r in tl.static_range(R):
                y += tl.load(y_ptr + t * stride_t + r * stride_r + d, mask=ok, other=0.0)
            if HAS_B:
                y += tl.load(b_ptr + d, mask=ok, other=0.0).to(tl.float32)
            x += y
        else:
            x += tl.load(y_ptr + t * D + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(res_ptr + t * D + d, x, mask=ok)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    v = x * inv * w
    if out_ptr.dtype.element_ty == tl.float16:  # saturated: float16 has no room above 65504
        v = tl.minimum(tl.maximum(v, -65504.0), 65504.0)
    tl.store(out_ptr + t * D + d, v.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, y: torch.Tensor | Partials | None, weight: torch.Tensor, eps: float,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res = torch.empty(x2.shape, dtype=torch.float32, device=x.device) if y is not None else out
    split = isinstance(y, Partials)
    if split and (y.rows, y.cols) != x2.shape:
        raise ValueError(f"add_rms_norm: partial sums of [{y.rows}, {y.cols}] for x of {list(x2.shape)}")
    y2 = y.part if split else y.reshape(-1, D).contiguous() if y is not None else x2
    bias = y.bias if split and y.bias is not None else x2
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, y2, weight, out, res, D, eps, y.stride_t if split else 0, y.stride_r if split else 0, bias,
            HAS_Y=y is not None, BD=triton.next_power_of_2(D), R=y.R if split else 0,
            HAS_B=split and y.bias is not None, num_warps=1 if INTERPRET else 8 if split else 4, **pdl_launch(),
        )  # fmt: skip
    return out.reshape(x.shape), res.reshape(x.shape)


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype = torch.bfloat16
                  ) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in out_dtype."""
    return _launch(x, None, weight, eps, out_dtype)[0]


def add_rms_norm_cuda(x: torch.Tensor, y: torch.Tensor | Partials, weight: torch.Tensor, eps: float,
                      out_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y in float32, rms_norm(x + y) in out_dtype) in one launch (y's split-K partial sums added there)."""
    out, res = _launch(x, y, weight, eps, out_dtype)
    return res, out
