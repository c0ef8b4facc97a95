"""The MoE router on CUDA (Triton): logits, top-k and the softmax over the chosen k in two launches a step.

For token t: logits[e] = h[t] . W[e] + b[e] over all E experts (float32), then the k largest (ties: the lower
expert id) and weights = softmax of those k logits. First launch: partial logits over slices of D (45 programs
a token for the 20B); second: per token, their sum (one load, one reduction tree of a fixed shape), the top-k and
the softmax. The order is fixed, so a token's experts and weights never depend on the other tokens of the step.
It replaces a float32 GEMM, a bias add, a top-k and a softmax (four to six launches a layer). The reference is
models/gpt_oss.py's torch path: `linear` + `torch.topk` + `torch.softmax`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.pdl import pdl_enter, pdl_launch
from worker_orcd.kernels.triton_attention import INTERPRET


@triton.jit
def _router_logits_kernel(h_ptr, w_ptr, part_ptr, D, stride_h, CHUNK, E: tl.constexpr, BE: tl.constexpr,
                          BD: tl.constexpr):
    """part[t, s, e] = h[t] . W[e] over columns [s * CHUNK, (s + 1) * CHUNK) of D, summed in a fixed order."""
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    e = tl.arange(0, BE)
    d = tl.arange(0, BD)
    acc = tl.zeros([BE, BD], dtype=tl.float32)
    hi = tl.minimum(s * CHUNK + CHUNK, D)
    for d0 in range(s * CHUNK, hi, BD):
        ok = d0 + d < hi
        x = tl.load(h_ptr + t * stride_h + d0 + d, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None] * D + (d0 + d)[None, :], mask=(e < E)[:, None] & ok[None, :], other=0.0)
        acc += w * x[None, :]
    tl.store(part_ptr + (t * tl.num_programs(1) + s) * BE + e, tl.sum(acc, axis=1))


@triton.jit
def _router_top_kernel(part_ptr, b_ptr, ids_ptr, weights_ptr, S, E: tl.constexpr, K: tl.constexpr,
                       BE: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr):
    """logits = the S partial sums (one load, a fixed reduction tree) + b; the K largest (ties: the lower expert
    id) and their softmax."""
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    s = tl.arange(0, BS)
    part = tl.load(part_ptr + (t * S + s[:, None]) * BE + e[None, :], mask=(s < S)[:, None], other=0.0)
    logits = tl.sum(part, axis=0) + tl.load(b_ptr + e, mask=e < E, other=0.0)
    logits = tl.where(e < E, logits, float("-inf"))
    j = tl.arange(0, BK)
    top = tl.full([BK], float("-inf"), dtype=tl.float32)
    ids = tl.zeros([BK], dtype=tl.int32)
    for i in tl.static_range(K):  # the largest left, then out of the running; equal values: the lower id
        best = tl.max(logits, axis=0)
        pick = tl.min(tl.where(logits == best, e, BE), axis=0)
        top = tl.where(j == i, best, top)
        ids = tl.where(j == i, pick, ids)
        logits = tl.where(e == pick, float("-inf"), logits)
    p = tl.exp(top - tl.max(top, axis=0))  # the padding past K is -inf: weight 0
    p = p / tl.sum(p, axis=0)
    tl.store(ids_ptr + t * K + j, ids.to(tl.int64), mask=j < K)
    tl.store(weights_ptr + t * K + j, p, mask=j < K)


# columns of D a logits program sums: the 20B's 2880 in 45 programs a token (one program a token took 22 us a
# layer on an H200 at any batch, 12% of a 1-stream decode step; H200, bench/gpu_tune.py small, both launches at
# T=1/16/64: 384 columns 8.3/8.6/9.0 us, 128 6.8/6.3/9.7, 64 5.8/6.1/8.5)
ROUTER_CHUNK = 64


def route(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, D] (any float dtype), router w [E, D] and bias b [E] in float32 -> (expert ids [T, k] int64,
    weights [T, k] float32), the ids of each row in descending order of their logits."""
    T, D = h.shape
    E = w.shape[0]
    if w.shape[1] != D or b.shape != (E,) or not 0 < k <= E:
        raise ValueError(f"route: h {list(h.shape)}, w {list(w.shape)}, b {list(b.shape)}, k {k}")
    w, b = w.float().contiguous(), b.float().contiguous()
    if h.stride(-1) != 1:
        h = h.contiguous()
    ids = torch.empty(T, k, dtype=torch.long, device=h.device)
    weights = torch.empty(T, k, dtype=torch.float32, device=h.device)
    if T:
        BE, chunk = triton.next_power_of_2(E), 64 if INTERPRET else ROUTER_CHUNK
        S = triton.cdiv(D, chunk)
        part = torch.empty(T, S, BE, dtype=torch.float32, device=h.device)
        _router_logits_kernel[(T, S)](h, w, part, D, h.stride(0), chunk, E=E, BE=BE,
                                      BD=64 if INTERPRET else min(128, chunk), num_warps=1 if INTERPRET else 4,
                                      **pdl_launch())
        _router_top_kernel[(T,)](part, b, ids, weights, S, E=E, K=k, BE=BE, BK=triton.next_power_of_2(k),
                                 BS=triton.next_power_of_2(S), num_warps=1, **pdl_launch())  # fmt: skip
    return ids, weights
