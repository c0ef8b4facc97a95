"""The MoE router on CUDA (Triton): logits, top-k and the softmax over the chosen k in one launch per step.

For token t: logits[e] = h[t] . W[e] + b[e] over all E experts (float32), then the k largest (ties: the lower
expert id) and weights = softmax of those k logits. One program per token sums its dot products in a fixed
order, so a token's experts and weights never depend on the other tokens of the step. It replaces a float32
GEMM, a bias add, a top-k and a softmax (four to six launches a layer). The reference is models/gpt_oss.py's
torch path: `linear` + `torch.topk` + `torch.softmax`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.triton_attention import INTERPRET


@triton.jit
def _router_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, weights_ptr, D, stride_h, E: tl.constexpr, K: tl.constexpr,
                   BE: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    d = tl.arange(0, BD)
    acc = tl.zeros([BE, BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        ok = d0 + d < D
        x = tl.load(h_ptr + t * stride_h + d0 + d, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None] * D + (d0 + d)[None, :], mask=(e < E)[:, None] & ok[None, :], other=0.0)
        acc += w * x[None, :]
    logits = tl.sum(acc, axis=1) + tl.load(b_ptr + e, mask=e < E, other=0.0)
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
        _router_kernel[(T,)](h, w, b, ids, weights, D, h.stride(0), E=E, K=k, BE=triton.next_power_of_2(E),
                             BK=triton.next_power_of_2(k), BD=64 if INTERPRET else 128,
                             num_warps=1 if INTERPRET else 8)
    return ids, weights
