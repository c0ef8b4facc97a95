"""Weight-only quantized matmul on CPU through torch's packed kernels, weights kept compact.

CPU decode is memory-bound: float32 copies of a 135M model stream ~500 MB per token, the GGUF
blocks ~90 MB. Q4_0 and Q4_1 blocks are multiplied as they are by llama.cpp's integer dot products
(cpu_q8dot.py) where this machine could build them; otherwise, and for the other formats, blocks are repacked
once, at load, into what torch's CPU kernels take:
- 4-bit formats with a scale and offset per 32 weights (Q4_0, Q4_1, Q4_K) become int4pack:
  w = (q - 8) * s + z per group, bf16 activations, float32 accumulation.
- 5-, 6- and 8-bit formats (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) become dense 2-byte weights: bf16 through
  oneDNN (one GEMM per matrix) or float16 through torch's GEMV (one call per row; the portable path).
  torch's int8 kernel takes one scale per output row, so these formats' per-32 scales needed one call
  per group (~1,800 calls per Gemma 3 token), whose cost grew with every row.
int4pack's scales and activations and oneDNN's bf16 are rounded to ~2^-9 relative, float16 to ~2^-12;
accumulation is float32.
F32/F16/BF16 weights return None: the caller keeps them exact (dequantize, one row at a time).
Which kernels this CPU runs (oneDNN's prepacked bf16 needs AVX-512 or AVX-NE-CONVERT; the portable path
does not) is decided once by cpu_caps.py, forced with WORKER_ORCD_CPU_KERNELS or `--cpu-kernels`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from gguf import GGMLQuantizationType as T

from worker_orcd.quant._bytes import f16, nibbles
from worker_orcd.quant.cpu_caps import cpu_kernels
from worker_orcd.quant.cpu_q8dot import KINDS as Q8DOT_KINDS
from worker_orcd.quant.cpu_q8dot import Q8DotLinear
from worker_orcd.quant.formats import dequantize
from worker_orcd.quant.tensor import MATMUL_KERNELS, QuantTensor, dequantize_matmul

INT4_TYPES = {T.Q4_0, T.Q4_1, T.Q4_K}
Q8DOT_TYPES = set(Q8DOT_KINDS)  # llama.cpp's integer dot products where cpu_caps found them (cpu_q8dot.py)
BF16_TYPES = {T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0}
GROUP = 32


def _f16(b: torch.Tensor) -> torch.Tensor:
    return f16(b).squeeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes: element j in the low nibble of byte j, j+16 in the high one."""
    return nibbles(qs).flatten(-2)


def _legacy4(blocks: torch.Tensor, has_min: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks [N, nb, 18|20] -> codes [N, K], scale [N, nb], zero [N, nb] (w = (q-8)*s + z)."""
    N = blocks.shape[0]
    d = _f16(blocks[..., 0:2])
    if has_min:
        m = _f16(blocks[..., 2:4])
        q = _nibbles(blocks[..., 4:20]).reshape(N, -1)
        return q, d, m + 8 * d  # w = d*q + m
    q = _nibbles(blocks[..., 2:18]).reshape(N, -1)
    return q, d, torch.zeros_like(d)  # w = d*(q-8)


def _q4_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K superblocks [N, nb, 144] -> codes [N, K], scale and zero per 32-weight sub-block [N, nb*8]."""
    d = _f16(blocks[..., 0:2])[..., None]
    dmin = _f16(blocks[..., 2:4])[..., None]
    sc12 = blocks[..., 4:16].to(torch.int32)
    # 6-bit scales and mins of the 8 sub-blocks, packed as in ggml's get_scale_min_k4
    lo_sc, lo_m = sc12[..., 0:4] & 63, sc12[..., 4:8] & 63
    hi_sc = (sc12[..., 8:12] & 0x0F) | ((sc12[..., 0:4] >> 6) << 4)
    hi_m = (sc12[..., 8:12] >> 4) | ((sc12[..., 4:8] >> 6) << 4)
    sc = torch.cat([lo_sc, hi_sc], -1).float()
    mn = torch.cat([lo_m, hi_m], -1).float()
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=-2)  # [N, nb, 4 chunks, lo/hi, 32]: sub-block 2j, 2j+1
    scale = d * sc
    zero = -dmin * mn + 8 * scale
    N = blocks.shape[0]
    return q.reshape(N, -1), scale.reshape(N, -1), zero.reshape(N, -1)


class Int4Linear:
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.out_features = codes.shape[0]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.scales_zeros = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # [K/32, N, 2]
        self.nbytes = self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales_zeros).to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


class Bf16Linear:
    """Dense bf16 weight through oneDNN, reordered once at load into its blocked layout (2x faster than
    F.linear, which reorders on every call; the results are the same bits). Needs oneDNN's bf16 ISA.

    oneDNN's one-row kernel accumulates differently from its many-row kernel once K >= ~1,536, so a single
    row is computed as two equal rows: a decode row then gets the same bits alone or in any batch."""

    def __init__(self, weight: torch.Tensor):
        self.out_features = weight.shape[0]
        w = weight.to(torch.bfloat16).contiguous()
        self.nbytes = w.numel() * 2
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        rows = x2.shape[0]
        if rows == 1:
            x2 = x2.expand(2, -1)
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.weight, None, "none", [], "")
        return y[:rows].to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class RowsLinear:
    """Dense weight in `dtype` (float16: the portable path; bf16 its fallback; float32: the reference), one GEMV
    per row.

    torch's half-precision GEMVs (one row) run on any CPU at memory speed (49152 x 576 head: ~1.6 ms on AVX2)
    where its GEMMs (two or more rows, without oneDNN's bf16 ISA) are 4-15x slower; and a row alone is what it
    is in any batch, by construction. float16 costs what bf16 costs and keeps 3 more mantissa bits (a Q8_0 head:
    3.6e-4 relative error instead of 2.9e-3), which is what moves near-ties: its narrow range is handled by
    powers of two (exact), the weight scaled once so its largest entry is in [0.5, 1), each activation row per
    call, so no product or sum of K of them can overflow."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.out_features = weight.shape[0]
        self.exp = 0  # the weight is kept as weight * 2**-exp
        if dtype == torch.float16:
            scaled, exp = _unit_scale(weight.float().reshape(1, -1))
            weight, self.exp = scaled.reshape(weight.shape), int(exp)  # max |weight| in [0.5, 1)
        self.weight = weight.to(dtype).contiguous()
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.weight.dtype == torch.float16:
            x2, exp = _unit_scale(x2.float())
        x2 = x2.to(self.weight.dtype)
        with _aten_kernels():
            rows = [torch.nn.functional.linear(x2[i : i + 1], self.weight) for i in range(x2.shape[0])]
        y = rows[0] if len(rows) == 1 else torch.cat(rows)
        if self.weight.dtype == torch.float16:
            y = y.float() * _pow2(exp) * 2.0**self.exp
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def _unit_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x times powers of two (exact) so each row's largest magnitude is in [0.5, 1); x = out * 2**exp."""
    _, exp = torch.frexp(x.abs().amax(-1, keepdim=True))
    exp = exp.clamp(-126, 127)  # a row under 2**-126 is as good as zero: scaled less, still exactly
    return x * _pow2(-exp), exp


def _pow2(exp: torch.Tensor) -> torch.Tensor:
    """2.0**exp for int32 exponents in [-126, 127], exactly (the float's bits; exp2 and ldexp go through pow)."""
    return ((exp + 127) << 23).view(torch.float32)


@contextmanager
def _aten_kernels() -> Iterator[None]:
    """Where oneDNN has bf16, torch sends a bf16 F.linear to it, reordering the weight on every call (the head:
    ~27 ms instead of ATen's GEMV ~3 ms, 1 thread); with oneDNN off, every CPU runs ATen's own kernel.
    The switch is process-wide: only the thread that runs the model multiplies bf16 matrices."""
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(was)


ROWS_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def dense_linear(weight: torch.Tensor) -> Bf16Linear | RowsLinear:
    """A dense weight on the kernel this CPU runs (cpu_caps.py)."""
    kind = cpu_kernels().dense
    if kind == "onednn-bf16":
        return Bf16Linear(weight)
    return RowsLinear(weight, ROWS_DTYPES[kind])


CpuLinear = Q8DotLinear | Int4Linear | Bf16Linear | RowsLinear


def pack_for_cpu(raw: torch.Tensor, ggml_type: T, shape: tuple[int, ...]) -> CpuLinear | None:
    """Repack a 2-D weight's blocks (uint8 [N, row_bytes]) for the CPU kernels; None if not supported."""
    if len(shape) != 2 or raw.device.type != "cpu":
        return None
    N, K = shape
    kernels = cpu_kernels()
    if kernels.q8dot and ggml_type in Q8DOT_TYPES:
        return Q8DotLinear(raw, ggml_type, shape)
    if ggml_type in INT4_TYPES and N % 16 == 0 and kernels.int4:  # int4pack takes whole tiles of 16 output rows
        blocks = raw.reshape(N, -1)
        if ggml_type == T.Q4_K:
            q, s, z = _q4_k(blocks.reshape(N, K // 256, 144))
        else:
            q, s, z = _legacy4(blocks.reshape(N, K // 32, -1), has_min=ggml_type == T.Q4_1)
        return Int4Linear(q, s, z)
    if ggml_type in BF16_TYPES or ggml_type in INT4_TYPES:
        return dense_linear(dequantize(raw, ggml_type, shape))
    return None


_UNPACKED = object()
# torch's packed CPU kernels are built for decode (a few rows); a long prefill amortizes one float32
# expansion over many rows and gets the exact float32 result as a bonus.
PACKED_MAX_ROWS = 16


def cpu_matmul(w: QuantTensor, x: torch.Tensor) -> torch.Tensor:
    """The CPU entry of MATMUL_KERNELS: packed kernels for decode-sized inputs where the format allows them,
    otherwise dequantize then matmul."""
    if x.numel() // x.shape[-1] > PACKED_MAX_ROWS:
        return dequantize_matmul(w, x)
    packed = w.__dict__.get("_cpu_packed", _UNPACKED)
    if packed is _UNPACKED:  # packed once, on first use, and kept beside the raw blocks
        packed = w._cpu_packed = pack_for_cpu(w.raw, w.ggml_type, w.shape)
    if packed is None:
        return rowwise_matmul(w, x)
    return packed(x)


def rowwise_matmul(w: QuantTensor, x: torch.Tensor) -> torch.Tensor:
    """Dequantize once, then one GEMV per row: a row's result must not depend on how many rows share
    the call (a batched decode must give what each sequence gets alone), which BLAS GEMM does not promise."""
    wt = w.dequantize(x.dtype).T
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.cat([x2[i : i + 1] @ wt for i in range(x2.shape[0])])
    return y.reshape(*x.shape[:-1], w.shape[0])


MATMUL_KERNELS["cpu"] = cpu_matmul
