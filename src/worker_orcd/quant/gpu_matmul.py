"""Quantized matmul on CUDA: fused Triton dequantize + GEMV/GEMM where a kernel exists, else the reference.

Q8_0 and MXFP4 weights are repacked into quant/packed.py's layouts (still 8.5 / 4.25 bits per weight, never
expanded): at load on CUDA, where the packing replaces the blocks (models/weights.py), otherwise on first use,
kept beside the blocks. Every other format,
and float64 activations, dequantize per call (correct everywhere, fast nowhere) until a kernel lands.
Decode rows (a few) run a CUDA-core GEMV accumulating in float32; prefill rows run tl.dot on bf16
operands (relative error ~2e-3).
"""

from __future__ import annotations

import torch

from worker_orcd.kernels.triton_quant import quant_matmul
from worker_orcd.quant.packed import PACKERS, PackedWeight
from worker_orcd.quant.tensor import MATMUL_KERNELS, QuantTensor, dequantize_matmul


def packed(w: QuantTensor) -> PackedWeight | None:
    """w's kernel layout (packed at load on CUDA, else on first use, and kept on w); None without a kernel."""
    if w.packed is None and w.ggml_type in PACKERS and len(w.shape) >= 2:
        w.packed = PACKERS[w.ggml_type](w.raw, w.shape[-2], w.shape[-1])
    return w.packed


def gpu_matmul(w: QuantTensor, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The CUDA entry of MATMUL_KERNELS (any device works, through the Triton interpreter on CPU)."""
    p = packed(w)
    if p is None or x.dtype == torch.float64:  # the kernels accumulate in float32; float64 asks for the reference
        y = dequantize_matmul(w, x)
        return y if out_dtype is None else y.to(out_dtype)
    return quant_matmul(p, x, out_dtype=out_dtype)


gpu_matmul.takes_out_dtype = True
MATMUL_KERNELS["cuda"] = gpu_matmul
