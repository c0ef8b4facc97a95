"""RMSNorm and LayerNorm (torch references; math in float32 whatever the input dtype)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker_orcd.kernels.triton_quant import Partials


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, cuda_dtype: torch.dtype = torch.bfloat16
             ) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, over the last dim. On CUDA one Triton launch whose output is in
    cuda_dtype (bf16, the dtype the matmuls take there; float16, saturated, for the folded decode GEMMs)."""
    if x.is_cuda:
        from worker_orcd.kernels.triton_norm import rms_norm_cuda

        return rms_norm_cuda(x, weight, eps, cuda_dtype)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # the CPU decode path: one call, same bits
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | Partials, weight: torch.Tensor, eps: float,
                 cuda_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y)): the residual add and the next norm, one launch on CUDA (where y may be a
    matmul's split-K Partials, summed in that launch; the norm comes out in cuda_dtype)."""
    if x.is_cuda:
        from worker_orcd.kernels.triton_norm import add_rms_norm_cuda

        return add_rms_norm_cuda(x, y, weight, eps, cuda_dtype)
    x = x + y
    return x, rms_norm(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, over the last dim (biased variance, as GPT-2)."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
