"""Quantized matmul on CUDA: fused Triton dequantize + GEMV/GEMM for every block format the models use.

Weights are repacked into quant/packed.py's layouts (the blocks' bits per weight, never expanded): at load on
CUDA, where the packing replaces the blocks (models/weights.py), otherwise on first use, kept beside the blocks.
Q8_0 and MXFP4 run kernels/triton_quant.py; Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K run
kernels/triton_kquant.py. Decode rows (<= DECODE_MAX_M) run tl.dot on bf16 operands, accumulating in float32
(relative error ~2e-3); prompt chunks dequantize to bf16 once per call and run cuBLAS. F32, F16 and BF16
matrices are held in their own dtype and multiplied by torch.matmul, x cast to the weight's dtype (F16: as
llama.cpp's cuBLAS path does). Float64 activations ask for the reference (dequantize per call).
"""

from __future__ import annotations

import torch

from worker_orcd.kernels.triton_kquant import kquant_matmul
from worker_orcd.kernels.triton_quant import quant_matmul
from worker_orcd.quant.packed import FLOAT_DTYPES, NIBBLE_FORMATS, PACKERS, PackedWeight
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
    if p.kind in FLOAT_DTYPES:
        y = torch.matmul(x.to(p.codes.dtype), p.codes.T)
        return y.to(out_dtype or x.dtype)
    if p.kind in NIBBLE_FORMATS:
        return kquant_matmul(p, x, out_dtype=out_dtype)
    return quant_matmul(p, x, out_dtype=out_dtype)


gpu_matmul.takes_out_dtype = True
MATMUL_KERNELS["cuda"] = gpu_matmul
