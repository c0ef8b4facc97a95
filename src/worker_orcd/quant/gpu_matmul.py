"""Quantized matmul on CUDA: fused Triton dequantize + GEMV/GEMM for every block format the models use.

Weights are repacked into quant/packed.py's layouts (the blocks' bits per weight, never expanded): at load on
CUDA, where the packing replaces the blocks (models/weights.py), otherwise on first use, kept beside the blocks.
Q8_0 and MXFP4 run kernels/triton_quant.py; Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K run
kernels/triton_kquant.py. Decode rows (<= DECODE_MAX_M) run tl.dot on bf16 operands, accumulating in float32
(relative error ~2e-3); prompt chunks dequantize to bf16 once per call and run cuBLAS. F32, F16 and BF16
matrices are held in their own dtype: decode rows run kernels/triton_float.py (cuBLAS is not batch-invariant),
prompt chunks torch.matmul, x cast to the weight's dtype (F16: as llama.cpp's cuBLAS path does). Float64
activations ask for the reference (dequantize per call).
"""

from __future__ import annotations

import torch

from worker_orcd.kernels.triton_float import float_matmul
from worker_orcd.kernels.triton_kquant import kquant_matmul
from worker_orcd.kernels.triton_quant import DECODE_MAX_M, quant_matmul
from worker_orcd.quant.packed import FLOAT_DTYPES, NIBBLE_FORMATS, PACKERS, PackedWeight
from worker_orcd.quant.tensor import MATMUL_KERNELS, QuantTensor, dequantize_matmul


def packed(w: QuantTensor) -> PackedWeight | None:
    """w's kernel layout (packed at load on CUDA, else on first use, and kept on w); None without a kernel."""
    if w.packed is None and w.ggml_type in PACKERS and len(w.shape) >= 2:
        w.packed = PACKERS[w.ggml_type](w.raw, w.shape[-2], w.shape[-1])
    return w.packed


def gpu_matmul(w: QuantTensor, x: torch.Tensor, out_dtype: torch.dtype | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The CUDA entry of MATMUL_KERNELS (any device works, through the Triton interpreter on CPU): x @ w.T, plus
    `bias` (inside the Q8_0/MXFP4 kernels' split-K sum where they split, else one add after)."""
    p = packed(w)
    if p is not None and p.kind not in FLOAT_DTYPES and p.kind not in NIBBLE_FORMATS and x.dtype != torch.float64:
        return quant_matmul(p, x, out_dtype=out_dtype, bias=bias)
    if p is None or x.dtype == torch.float64:  # the kernels accumulate in float32; float64 asks for the reference
        y = dequantize_matmul(w, x)
        y = y if out_dtype is None else y.to(out_dtype)
    elif p.kind in FLOAT_DTYPES and x.numel() <= DECODE_MAX_M * w.shape[-1]:
        return float_matmul(p, x, out_dtype=out_dtype, bias=bias)
    elif p.kind in FLOAT_DTYPES:
        y = torch.matmul(x.to(p.codes.dtype), p.codes.T).to(out_dtype or x.dtype)
    else:
        y = kquant_matmul(p, x, out_dtype=out_dtype)
    return y if bias is None else y.add_(bias)


gpu_matmul.takes_out_dtype = True
gpu_matmul.takes_bias = True
MATMUL_KERNELS["cuda"] = gpu_matmul
