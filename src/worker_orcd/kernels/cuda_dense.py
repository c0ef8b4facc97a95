"""Dense Q8_0 decode GEMMs on mma.sync: q8_gemm of mma_decode.cu (kernels/nvrtc.py compiles and launches it), for
every decode-sized batch (up to triton_quant.DECODE_MAX_M rows) of the layers' matrices (up to MAX_N rows)
where it runs, instead of the Triton tl.dot tiles.

The MoE kernels' design (kernels/cuda_moe.py) for the q|k|v, o and output matrices: the weight rows are the
mma's m16 side, decoded from their int8 words straight into A fragments (one mask and one subtraction a pair),
the rows of x its n8 columns (8 or 16 a CTA; more rows, more CTAs over the same weight tile, through L2), each
block's float16 scale applied to its two mmas' sum in float32, and a CTA's warps adding their runs of K in
shared memory in a fixed order. Results are whole (no split-K partials) and a row's bits never depend on the
others: the kernel, its tile and its runs of K follow the weight's shape alone.

Off (the Triton tiles run) without NVRTC or sm_80, for weights not Q8_0 row by row, for the output matrix, for x
not float16/bfloat16, or with WORKER_ORCD_CUDA_DENSE=0.
"""

from __future__ import annotations

import os

import torch

from worker_orcd.kernels import nvrtc
from worker_orcd.quant.packed import PackedWeight

OUT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# Up to this many rows of W (the layers' matrices). H200, bench/gpu_mma_dense.py, L2 flushed, us at M=1/64: q|k|v
# 5120x2880 9.7/32.6 (Triton tiles 14.0/24.6), o 2880x4096 9.5/29.2 (12.3/22.0); the 201088-row output matrix
# 212-260/848-998 in six configs against the tiles' 198/587, so it stays with them.
MAX_N = 16384


def config(n: int, k: int) -> tuple[int, int, int, int]:
    """(m16 tiles a CTA, warps a tile over runs of K, blocks a load stage, min CTAs an SM) by the weight's shape
    alone (the runs of K set a row's bits). H200, bench/gpu_mma_dense.py: of 7 configs the fastest at one row."""
    return (1, 8, 2, 1)


def _name(cfg: tuple[int, ...], nt: int, xbf: bool, out: int) -> str:
    return f"q8_gemm<{', '.join(map(str, cfg))}, {nt}, {str(xbf).lower()}, {out}>"


def usable(w: PackedWeight, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether q8_gemm takes y = x W^T: CUDA sm_80+, NVRTC present (the first call compiles), Q8_0 row by row
    with N % 16 == 0 and N <= MAX_N, x float16/bfloat16 rows aligned to 16 bytes, y float32/16 or bfloat16."""
    if not x.is_cuda or os.environ.get("WORKER_ORCD_CUDA_DENSE", "1") == "0":
        return False
    if w.kind != "q8_0" or w.group != 1 or w.n % 16 or w.n > MAX_N or w.k % 32:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if y.dtype not in OUT or x.data_ptr() % 16 or (x.stride(0) * 2) % 16 or w.codes.data_ptr() % 8:
        return False
    return nvrtc.probe(x.device, [_name(config(w.n, w.k), 1, False, 0)], "dense mma kernels", "the Triton tiles")


def q8_matmul(
    w: PackedWeight,
    x: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None = None,
    cfg: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] (unit stride along K) @ W^T (+ bias [N], float32), every row summed alone."""
    M = x.shape[0]
    cfg = cfg or config(w.n, w.k)
    nt = 1 if M <= 8 else 2
    name = _name(cfg, nt, x.dtype == torch.bfloat16, OUT[y.dtype])
    kern = nvrtc.load(x.device, [name])[name]
    b = bias.float().contiguous() if bias is not None else None
    kern((w.n // (16 * cfg[0]), -(-M // (8 * nt)), 1), 32 * cfg[0] * cfg[1], x, w.codes, w.scales, b, y, M, w.n,
         w.k, x.stride(0), w.n)  # fmt: skip
    return y
