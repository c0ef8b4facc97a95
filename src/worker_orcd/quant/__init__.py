"""ggml block formats: byte layouts, torch dequantizers (checked bit-exact against gguf.quants), QuantTensor.

One module per family of formats: floats (F32, F16, BF16), legacy (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0),
kquants (Q4_K, Q5_K, Q6_K), mxfp4 (MXFP4). formats maps ggml types to them.
"""

from gguf import GGMLQuantizationType as GGMLType

from worker_orcd.quant import cpu_matmul  # noqa: E402,F401  (registers the CPU packed kernels)
from worker_orcd.quant.formats import SUPPORTED_TYPES, dequantize
from worker_orcd.quant.tensor import MATMUL_KERNELS, QuantTensor

__all__ = ["GGMLType", "MATMUL_KERNELS", "SUPPORTED_TYPES", "QuantTensor", "dequantize"]
