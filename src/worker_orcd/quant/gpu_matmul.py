"""Quantized matmul on CUDA: fused Triton dequantize + GEMV/GEMM where a kernel exists, else the reference.

Q8_0 and MXFP4 weights are repacked once, on first use, into the layouts of kernels/triton_quant.py
(still 8.5 / 4.25 bits per weight, never expanded) and kept beside the raw blocks. Every other format,
and float64 activations, dequantize per call (correct everywhere, fast nowhere) until a kernel lands.
Decode rows (a few) run a CUDA-core GEMV accumulating in float32; prefill rows run tl.dot on bf16
operands (relative error ~2e-3).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from worker_orcd.kernels.triton_quant import PackedWeight, pack_mxfp4, pack_q8_0, quant_matmul
from worker_orcd.quant.tensor import MATMUL_KERNELS, QuantTensor, dequantize_matmul

PACKERS = {T.Q8_0: pack_q8_0, T.MXFP4: pack_mxfp4}
_UNPACKED = object()


def packed(w: QuantTensor) -> PackedWeight | None:
    """w's kernel layout (rows = all leading dims), built on first use and cached on w; None without a kernel."""
    p = w.__dict__.get("_gpu_packed", _UNPACKED)
    if p is _UNPACKED:
        pack = PACKERS.get(w.ggml_type)
        p = None if pack is None else pack(w.raw, w.shape[-2] if len(w.shape) > 1 else 1, w.shape[-1])
        w._gpu_packed = p
    return p


def gpu_matmul(w: QuantTensor, x: torch.Tensor) -> torch.Tensor:
    """The CUDA entry of MATMUL_KERNELS (any device works, through the Triton interpreter on CPU)."""
    p = packed(w)
    if p is None or x.dtype == torch.float64:  # the kernels accumulate in float32; float64 asks for the reference
        return dequantize_matmul(w, x)
    return quant_matmul(p, x)


MATMUL_KERNELS["cuda"] = gpu_matmul
