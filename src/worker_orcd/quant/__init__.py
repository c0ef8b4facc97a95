"""ggml block formats: byte layouts, torch dequantizers (checked bit-exact against gguf.quants), QuantTensor.

One module per family of formats: floats (F32, F16, BF16), legacy (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0),
kquants (Q4_K, Q5_K, Q6_K), mxfp4 (MXFP4). formats maps ggml types to them.
"""

from gguf import GGMLQuantizationType as GGMLType

from worker_orcd.quant import cpu_matmul  # noqa: F401  (registers the CPU packed kernels)
from worker_orcd.quant.formats import SUPPORTED_TYPES, dequantize
from worker_orcd.quant.tensor import MATMUL_KERNELS, QuantTensor, dequantize_matmul


def _first_cuda_matmul(w: QuantTensor, x):
    """Loads the Triton kernels on the first CUDA matmul (importing triton costs; CPU-only installs lack it).
    Importing gpu_matmul registers it in MATMUL_KERNELS; without Triton, CUDA keeps the on-device reference."""
    try:
        from worker_orcd.quant import gpu_matmul
    except ImportError:
        MATMUL_KERNELS["cuda"] = dequantize_matmul
        return dequantize_matmul(w, x)
    return gpu_matmul.gpu_matmul(w, x)


MATMUL_KERNELS.setdefault("cuda", _first_cuda_matmul)

__all__ = ["GGMLType", "MATMUL_KERNELS", "SUPPORTED_TYPES", "QuantTensor", "dequantize"]
