"""GPT-OSS MoE decode with MXFP4 experts (Triton), beside its torch reference.

For each token t and each of its k chosen experts e (weight w_te):
    h = clamped_swiglu(gate_e . x_t + bg_e, up_e . x_t + bu_e)            [F]
    y_t = sum_e w_te * (down_e . h + bd_e)                                 [D]
Three launches: gate/up (fused dequantize + GEMV for both matrices, + bias, + clamped SwiGLU), down
(fused dequantize + GEMV, + bias, times the routing weight, split over F when that fills the GPU better),
and a row sum that adds each token's k (x splits) partial rows in a fixed order, so results do not depend
on scheduling. Only the chosen experts' rows are read.
A program serves one (token, expert) pair: for one token, each needed weight byte is read once; tokens
sharing an expert read its rows again (mostly from L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_orcd.kernels import cuda_moe
from worker_orcd.kernels.activations import clamped_swiglu
from worker_orcd.kernels.pdl import pdl_enter, pdl_launch
from worker_orcd.kernels.triton_quant import (
    F16_TILES,
    FOLD,
    GEMV_ROWS,
    INTERPRET,
    W_LEFT,
    PackedWeight,
    Partials,
    _dot_f16_blocks,
    _e8m0,
    _mx_pair,
    _mxfp4_gemv_tile,
    _row_words,
    dequantize_packed,
    split_k,
    sum_partials_kernel,
)
from worker_orcd.quant.tensor import QuantTensor

SWIGLU_LIMIT = 7.0
SWIGLU_ALPHA = 1.702


@triton.jit
def _gate_up_kernel(
    x_ptr,
    ids_ptr,
    order_ptr,
    gw_ptr,
    ge_ptr,
    gb_ptr,
    uw_ptr,
    ue_ptr,
    ub_ptr,
    h_ptr,
    F,
    D,
    K_SLOTS,
    limit,
    alpha,
    BN: tl.constexpr,
    NB: tl.constexpr,
    EVEN: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP: tl.constexpr = 1,
):
    """h[p, f] for pair p = t * k + slot, rows f of expert ids[p]; gate and up read in the same loop.
    Programs take the pairs in `order` (sorted by expert: an expert's pairs run together and share its
    weights through L2)."""
    pdl_enter()
    p = tl.load(order_ptr + tl.program_id(1))
    e = tl.load(ids_ptr + p).to(tl.int32)
    f = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = e * F + tl.minimum(f, F - 1)
    x = x_ptr + (p // K_SLOTS) * D
    g, u = _mxfp4_gemv_tile(x, gw_ptr, ge_ptr, uw_ptr, ue_ptr, rows, D, 0, D // 32, BN, NB, EVEN, STAGES, True,
                            GROUP)  # fmt: skip
    g = tl.minimum(g + tl.load(gb_ptr + rows), limit)
    u = tl.minimum(tl.maximum(u + tl.load(ub_ptr + rows), -limit), limit)
    h = (u + 1.0) * g * tl.sigmoid(alpha * g)
    tl.store(h_ptr + p * F + f, h, mask=f < F)


@triton.jit
def _down_kernel(
    h_ptr,
    ids_ptr,
    order_ptr,
    w_ptr,
    dw_ptr,
    de_ptr,
    db_ptr,
    out_ptr,
    F,
    D,
    CHUNK,
    BN: tl.constexpr,
    NB: tl.constexpr,
    EVEN: tl.constexpr,
    STAGES: tl.constexpr,
    GROUP: tl.constexpr = 1,
):
    """out[p, split, d] = w[p] * (down_e[d] . h[p] over the split's blocks (+ bd_e[d] in split 0))."""
    pdl_enter()
    p = tl.load(order_ptr + tl.program_id(1))
    split = tl.program_id(2)
    e = tl.load(ids_ptr + p).to(tl.int32)
    d = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = e * D + tl.minimum(d, D - 1)
    kb_lo = split * CHUNK
    kb_hi = tl.minimum(kb_lo + CHUNK, F // 32)
    y, _ = _mxfp4_gemv_tile(
        h_ptr + p * F, dw_ptr, de_ptr, dw_ptr, de_ptr, rows, F, kb_lo, kb_hi, BN, NB, EVEN, STAGES, False, GROUP
    )
    y += tl.load(db_ptr + rows) * (split == 0)
    tl.store(out_ptr + (p * tl.num_programs(2) + split) * D + d, y * tl.load(w_ptr + p).to(tl.float32), mask=d < D)


def moe_config() -> dict:
    """Row tiles, blocks per step, pipeline depth, and the program count that down's split-K aims for."""
    if INTERPRET:
        return {"BN": 32, "NB": 2, "STAGES": 0, "TARGET": 1, "num_warps": 1}
    return {"BN": 8, "NB": 8, "STAGES": 0, "TARGET": 1024, "num_warps": 2}  # H200 sweep: bench/gpu_tune.py


def _packed(w: QuantTensor, name: str) -> PackedWeight:
    from worker_orcd.quant.gpu_matmul import packed  # the one cache of repacked weights

    p = packed(w)
    if p is None or p.kind != "mxfp4" or len(w.shape) != 3:
        raise ValueError(f"moe_mxfp4: {name} must be a stacked MXFP4 [experts, rows, cols] tensor, got {w!r}")
    return p


def _group(gate: PackedWeight, up: PackedWeight) -> int:
    """The row group gate and up share (one kernel reads both with one offset)."""
    if gate.group != up.group:
        raise ValueError(f"gate and up experts packed with different row groups: {gate.group}, {up.group}")
    return gate.group


def moe_mxfp4(
    x: torch.Tensor,
    top_ids: torch.Tensor,
    top_w: torch.Tensor,
    gate: QuantTensor,
    gate_b: torch.Tensor,
    up: QuantTensor,
    up_b: torch.Tensor,
    down: QuantTensor,
    down_b: torch.Tensor,
    cfg: dict | None = None,
    limit: float = SWIGLU_LIMIT,
    alpha: float = SWIGLU_ALPHA,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, D], top_ids [T, k] (int), top_w [T, k]; gate/up [E, F, D], down [E, D, F] MXFP4, biases f32 [E, *].

    Returns y [T, D] in x.dtype (written into `out` if given).
    """
    T, D = x.shape
    k = top_ids.shape[1]
    E, F, _ = gate.shape
    if gate.shape != (E, F, D) or up.shape != (E, F, D) or down.shape != (E, D, F):
        raise ValueError(
            f"moe_mxfp4: x [{T}, {D}] needs gate/up [E, F, {D}] and down [E, {D}, F], "
            f"got {gate.shape}, {up.shape}, {down.shape}"
        )
    ids = top_ids.reshape(-1).contiguous()
    order = torch.argsort(ids, stable=True).to(torch.int32)  # pairs by expert, on the device
    h = moe_gate_up(x, ids, k, gate, gate_b, up, up_b, cfg, limit, alpha, order)
    part = moe_down(h, ids, top_w.reshape(-1).contiguous(), down, down_b, cfg, order)
    return _token_sums(part, T, x.dtype, out)


def _token_sums(part: torch.Tensor, T: int, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """part [T*k, splits, D] float32 -> y [T, D] (into `out`): each token's k experts and down's splits added
    in a fixed order, so a token's sum never depends on the others."""
    D = part.shape[-1]
    y = torch.empty(T, D, dtype=dtype, device=part.device) if out is None else out
    R = part.shape[0] // T * part.shape[1]
    sum_partials_kernel[(T, triton.cdiv(D, 1024))](part, y, D, R * D, D, R=R, BJ=1024, **pdl_launch())
    return y


def moe_gate_up(x, ids, k, gate, gate_b, up, up_b, cfg=None, limit=SWIGLU_LIMIT, alpha=SWIGLU_ALPHA,
                order=None) -> torch.Tensor:
    """h [T*k, F] float32: clamped SwiGLU of expert ids[p]'s gate and up rows on token p // k."""
    gp, upk = _packed(gate, "gate"), _packed(up, "up")
    c = dict(cfg or moe_config())
    BN, NB, stages, _ = c.pop("BN"), c.pop("NB"), c.pop("STAGES"), c.pop("TARGET")
    E, F, D = gate.shape
    P = ids.numel()
    h = torch.empty(P, F, dtype=torch.float32, device=x.device)
    order = torch.arange(P, dtype=torch.int32, device=x.device) if order is None else order
    _gate_up_kernel[(triton.cdiv(F, BN), P)](
        x.contiguous(), ids, order, gp.codes, gp.scales, gate_b.float().contiguous(), upk.codes, upk.scales,
        up_b.float().contiguous(), h, F, D, k, limit, alpha, BN=BN, NB=NB, EVEN=(D // 32) % NB == 0, STAGES=stages,
        GROUP=_group(gp, upk), **c, **pdl_launch(),
    )  # fmt: skip
    return h


def moe_down(h, ids, w, down, down_b, cfg=None, order=None) -> torch.Tensor:
    """part [T*k, splits, D] float32: w[p] * (down rows of expert ids[p] . h[p] + bias), split over F by the
    weight's shape alone (never by the pair count: a pair's sum does not depend on the batch)."""
    dp = _packed(down, "down")
    c = dict(cfg or moe_config())
    BN, NB, stages, target = c.pop("BN"), c.pop("NB"), c.pop("STAGES"), c.pop("TARGET")
    E, D, F = down.shape
    P = ids.numel()
    tiles = triton.cdiv(D, BN)
    splits, chunk = split_k(F // 32, tiles, NB, target)
    part = torch.empty(P, splits, D, dtype=torch.float32, device=h.device)
    order = torch.arange(P, dtype=torch.int32, device=h.device) if order is None else order
    _down_kernel[(tiles, P, splits)](
        h, ids, order, w, dp.codes, dp.scales, down_b.float().contiguous(), part, F, D, chunk, BN=BN, NB=NB,
        EVEN=(F // 32) % chunk == 0, STAGES=stages, GROUP=dp.group, **c, **pdl_launch(),
    )  # fmt: skip
    return part


def expert_rows(w: QuantTensor, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expert e of a stacked [E, rows, cols] tensor, dequantized: [rows, cols]."""
    return w.stacked(e).dequantize(dtype)


def moe_reference(
    x: torch.Tensor,
    top_ids: torch.Tensor,
    top_w: torch.Tensor,
    gate: QuantTensor,
    gate_b: torch.Tensor,
    up: QuantTensor,
    up_b: torch.Tensor,
    down: QuantTensor,
    down_b: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    limit: float = SWIGLU_LIMIT,
    alpha: float = SWIGLU_ALPHA,
) -> torch.Tensor:
    """The same function in torch, in `dtype`, one (token, expert) pair at a time."""
    y = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for t in range(x.shape[0]):
        xt = x[t].to(dtype)
        for j in range(top_ids.shape[1]):
            e = int(top_ids[t, j])
            g = expert_rows(gate, e, dtype) @ xt + gate_b[e].to(dtype)
            u = expert_rows(up, e, dtype) @ xt + up_b[e].to(dtype)
            h = clamped_swiglu(g, u, limit, alpha)
            y[t] += top_w[t, j].to(dtype) * (expert_rows(down, e, dtype) @ h + down_b[e].to(dtype))
    return y


# ---------------------------------------------------------------- any number of tokens
# Decode-sized batches (up to PREFILL_ABOVE tokens) run the expert tiles (moe_tiles, below); prompt chunks
# dequantize the experts once and run torch._grouped_mm over the pairs sorted by expert. Tried and dropped:
# CUDA-core tiles decoding an expert once for 2-8 pairs (T=1 147-240 us, T=64 1,742-2,547: register-bound).

GROUP_M = 16  # rows of each expert's segment in the grouped GEMM are padded to this
# Batch invariance needs one MoE kernel for every decode batch: the expert tiles. The per-pair kernels are faster
# up to ~16 tokens (H200, us a layer: T=1 61 vs 96, T=4 134 vs 220, T=16 431 vs 447; T=64 1,592 vs 513), so
# WORKER_ORCD_NONDETERMINISTIC=1 (serve --nondeterministic) takes them there, as the dense path takes its GEMV.
PAIR_ROWS = 16 if GEMV_ROWS else 0
PREFILL_ABOVE = 128  # tokens; as quant_matmul's DECODE_MAX_M


def group_pairs(top_ids: torch.Tensor, n_experts: int, group: int = GROUP_M) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs p = t * k + slot sorted by expert into tiles of `group` pairs of one expert, on the device with
    no host sync: (pairs [tiles * group] int32, -1 pads each expert's last tile; tile_expert [tiles] int32,
    n_experts past the used tiles). tiles = ceil(P / group) + min(E, P) bounds what any routing needs."""
    flat = top_ids.reshape(-1).long()
    P = flat.numel()
    n_tiles = -(-P // group) + min(n_experts, P)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    tiles_per = (counts + group - 1) // group
    tile_end = torch.cumsum(tiles_per, 0)
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    rank = torch.arange(P, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    dest = (tile_end - tiles_per)[sorted_e] * group + rank
    pairs = torch.full((n_tiles * group,), -1, dtype=torch.int32, device=flat.device)
    pairs[dest] = order.to(torch.int32)
    tiles = torch.arange(n_tiles, device=flat.device)
    tile_expert = torch.searchsorted(tile_end, tiles, right=True).to(torch.int32)
    return pairs, tile_expert


def moe_grouped(
    x: torch.Tensor,
    top_ids: torch.Tensor,
    top_w: torch.Tensor,
    gate: QuantTensor,
    gate_b: torch.Tensor,
    up: QuantTensor,
    up_b: torch.Tensor,
    down: QuantTensor,
    down_b: torch.Tensor,
    limit: float = SWIGLU_LIMIT,
    alpha: float = SWIGLU_ALPHA,
    cfg: dict | None = None,
    partials: bool = False,
) -> torch.Tensor | Partials:
    """The MoE of moe_reference for any number of tokens: x [T, D], top_ids/top_w [T, k] -> y [T, D] float32.
    Up to PREFILL_ABOVE tokens (every decode step) the mma kernels of cuda_moe where they run, else the expert
    tiles (moe_tiles); more (prompt chunks):
    moe_prefill. partials: the expert tiles may return their k x splits partial rows unsummed (Partials), for
    the next add_rms_norm to add in its own launch."""
    T = x.shape[0]
    gp, upk, dp = _packed(gate, "gate"), _packed(up, "up"), _packed(down, "down")
    if T > PREFILL_ABOVE and not INTERPRET and hasattr(torch, "_grouped_mm"):
        return moe_prefill(x, top_ids, top_w, gp, gate_b, upk, up_b, dp, down_b, limit, alpha)
    if cuda_moe.usable(x, gp, upk, dp):  # CUDA: the mma kernels, batch-invariant as the tiles
        E, k = gate_b.shape[0], top_ids.shape[1]
        tiles = None if T <= cuda_moe.DIRECT_MAX else route_tiles(top_ids, E, cuda_moe.PAIRS)
        part = cuda_moe.moe_mma(x, top_ids, top_w, tiles, gp, gate_b, upk, up_b, dp, down_b, limit, alpha)
        if partials:
            return Partials(part, T, x.shape[1], k, k * x.shape[1], x.shape[1], dtype=torch.float32)
        return _token_sums(part, T, torch.float32, None)
    out = torch.empty(T, x.shape[1], dtype=torch.float32, device=x.device)
    if T <= PAIR_ROWS:  # --nondeterministic: the per-pair kernels where they are faster (not batch-invariant)
        return moe_mxfp4(x, top_ids, top_w, gate, gate_b, up, up_b, down, down_b, None, limit, alpha, out=out)
    return moe_tiles(x, top_ids, top_w, gate, gate_b, up, up_b, down, down_b, cfg, limit, alpha, out=out,
                     partials=partials)


# ---------------------------------------------------------------- expert tiles on tensor cores
# Pairs sorted by expert into tiles of BM pairs of one expert (group_pairs); a program multiplies one tile's
# rows of x by BN rows of its expert, decoding each weight once for the tile (one tl.dot a step of NB
# blocks). A row's sums never depend on the other rows of its tile (the dot computes rows apart), and the
# tiles, steps and down's split of F follow the weights' shape: results do not depend on the batch.


@triton.jit
def _mxfp4_tile(w, s, dot_t: tl.constexpr):
    """Packed MXFP4 words [BN, NW] and each word's block exponent [BN, NW] -> weights [BN, NW*8] in dot_t, in
    element order: word w holds element 8 (w % 4) + 2s + h of block w // 4 in slot s, half h (quant/packed.py)."""
    w = w.to(tl.uint32, bitcast=True)
    BN: tl.constexpr = w.shape[0]
    NW: tl.constexpr = w.shape[1]
    s = _e8m0(s) * 16384.0
    lo0, hi0 = _mx_pair(w, 0)
    lo1, hi1 = _mx_pair(w, 1)
    lo2, hi2 = _mx_pair(w, 2)
    lo3, hi3 = _mx_pair(w, 3)
    lo0, lo1, lo2, lo3 = (lo0 * s).to(dot_t), (lo1 * s).to(dot_t), (lo2 * s).to(dot_t), (lo3 * s).to(dot_t)
    hi0, hi1, hi2, hi3 = (hi0 * s).to(dot_t), (hi1 * s).to(dot_t), (hi2 * s).to(dot_t), (hi3 * s).to(dot_t)
    t = tl.join(tl.join(tl.join(lo0, lo1), tl.join(lo2, lo3)), tl.join(tl.join(hi0, hi1), tl.join(hi2, hi3)))
    # t [BN, NW, a, b, h] holds slot a + 2b, half h: element 8 (w % 4) + 4b + 2a + h of block w // 4
    t = tl.permute(tl.reshape(t, [BN, NW // 4, 4, 2, 2, 2]), 0, 1, 2, 4, 3, 5)
    return tl.reshape(t, [BN, NW * 8])


@triton.jit
def _expert_dot(x_rows, ok_m, w_ptr, e_ptr, w2_ptr, e2_ptr, rows, K, kb_lo, kb_hi, BM: tl.constexpr,
                BN: tl.constexpr, NB: tl.constexpr, TWO: tl.constexpr, DOT_F32: tl.constexpr,
                F16: tl.constexpr = False, GROUP: tl.constexpr = 1, W_LEFT: tl.constexpr = False,
                FOLD: tl.constexpr = False):
    """x rows (pointers [BM] to K values, masked by ok_m) . MXFP4 rows [BN] of W (and of W2) over blocks
    [kb_lo, kb_hi) -> float32 [BM, BN] (twice): each step of NB blocks one decode and one tl.dot.
    F16: float16 block tiles instead (triton_quant._dot_f16_blocks). GROUP: the codes' row groups (quant/packed.py)."""
    if F16:
        return _dot_f16_blocks(x_rows, ok_m, w_ptr, e_ptr, w2_ptr, e2_ptr, rows, K // 32, kb_lo, kb_hi, BM, BN, NB,
                               TWO, True, DOT_F32, GROUP, W_LEFT, FOLD)  # fmt: skip
    nblk = K // 32
    dot_t = tl.float32 if DOT_F32 else tl.bfloat16
    kw = tl.arange(0, NB * 4)
    w_off = _row_words(rows, nblk, 4, GROUP)[:, None] + ((kw // 4) * (GROUP * 4) + kw % 4)[None, :]
    e_off = rows[:, None] * nblk + (kw // 4)[None, :]
    kx = tl.arange(0, NB * 32)
    x_ptrs = x_rows[:, None] + kx[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi, NB):
        okw = (kb + kw // 4 < kb_hi)[None, :]
        x = tl.load(x_ptrs + kb * 32, mask=ok_m[:, None] & (kb + kx // 32 < kb_hi)[None, :], other=0.0).to(dot_t)
        w = tl.load(w_ptr + w_off + kb * (GROUP * 4), mask=okw, other=0)
        e = tl.load(e_ptr + e_off + kb, mask=okw, other=0)
        acc = tl.dot(x, tl.trans(_mxfp4_tile(w, e, dot_t)), acc)
        if TWO:
            w2 = tl.load(w2_ptr + w_off + kb * (GROUP * 4), mask=okw, other=0)
            e2 = tl.load(e2_ptr + e_off + kb, mask=okw, other=0)
            acc2 = tl.dot(x, tl.trans(_mxfp4_tile(w2, e2, dot_t)), acc2)
    return acc, acc2


@triton.jit(do_not_specialize=["P", "N_SLOTS"])
def _route_tiles_kernel(ids_ptr, pairs_ptr, tile_e_ptr, P, E: tl.constexpr, N_SLOTS, BM: tl.constexpr,
                        BP: tl.constexpr, BE: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr):
    """group_pairs in one program: sort the P pairs by (expert, index), place each expert's run at the start of
    its tiles, -1 in the rest of its last tile, and name each tile's expert (E past the used tiles)."""
    pdl_enter()
    i = tl.arange(0, BP)
    e = tl.load(ids_ptr + i, mask=i < P, other=E).to(tl.int32)
    key = tl.sort(e * BP + i)  # pads (expert E) sort last
    se = key // BP
    ee = tl.arange(0, BE)
    counts = tl.sum((e[None, :] == ee[:, None]).to(tl.int32), axis=1)  # [BE]; pads and ee >= E count 0
    start = tl.cumsum(counts, 0) - counts
    tiles_per = (counts + BM - 1) // BM
    tile_end = tl.cumsum(tiles_per, 0)
    onehot = se[:, None] == ee[None, :]  # [BP, BE]
    st = tl.sum(tl.where(onehot, start[None, :], 0), axis=1)
    ts = tl.sum(tl.where(onehot, (tile_end - tiles_per)[None, :], 0), axis=1)
    slot = tl.arange(0, BS)
    tl.store(pairs_ptr + slot, tl.full([BS], -1, tl.int32), mask=slot < N_SLOTS)
    tl.debug_barrier()  # the pads are written before any pair lands
    tl.store(pairs_ptr + ts * BM + (i - st), key % BP, mask=se < E)
    t = tl.arange(0, BT)
    te = tl.sum(((tile_end[None, :] <= t[:, None]) & (ee < E)[None, :]).to(tl.int32), axis=1)
    tl.store(tile_e_ptr + t, te, mask=t < N_SLOTS // BM)


ROUTE_MIN_PAIRS = 64  # the routing kernel's sizes come in powers of two from here: 4 compiles cover 512 pairs
_route_warm: set[tuple] = set()


def route_tiles(top_ids: torch.Tensor, n_experts: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """group_pairs's result from one small kernel (decode-sized batches). Its block sizes are
    bucketed, and every bucket up to PREFILL_ABOVE tokens is compiled at the first call (outside a graph
    capture): a first batch of a new size must not stall serving for a compile (~1 s each)."""
    P = top_ids.numel()
    k = top_ids.shape[-1]
    key = (top_ids.device, n_experts, group, k)
    if key not in _route_warm and top_ids.is_cuda and not torch.cuda.is_current_stream_capturing():
        _route_warm.add(key)
        bucket = ROUTE_MIN_PAIRS
        while bucket <= triton.next_power_of_2(PREFILL_ABOVE * k):
            route_tiles(torch.zeros(-(-bucket // k), k, dtype=top_ids.dtype, device=top_ids.device), n_experts, group)
            bucket *= 2
    n_tiles = -(-P // group) + min(n_experts, P)
    pairs = torch.empty(n_tiles * group, dtype=torch.int32, device=top_ids.device)
    tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=top_ids.device)
    BP = max(ROUTE_MIN_PAIRS, triton.next_power_of_2(P))
    BT = triton.next_power_of_2(-(-BP // group) + min(n_experts, BP))  # the bucket's most tiles
    _route_tiles_kernel[(1,)](
        top_ids.reshape(-1), pairs, tile_expert, P, E=n_experts, N_SLOTS=n_tiles * group, BM=group, BP=BP,
        BE=triton.next_power_of_2(n_experts + 1), BS=BT * group, BT=BT, num_warps=4, **pdl_launch(),
    )  # fmt: skip
    return pairs, tile_expert


@triton.jit(do_not_specialize=["K_SLOTS", "N_PAIRS"])
def _tiles_gate_up_kernel(x_ptr, pairs_ptr, tile_e_ptr, gw_ptr, ge_ptr, gb_ptr, uw_ptr, ue_ptr, ub_ptr, h_ptr,
                          part_ptr, E, F, D, K_SLOTS, N_PAIRS, CHUNK, limit, alpha,
                          BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, DOT_F32: tl.constexpr,
                          SPLIT: tl.constexpr, F16: tl.constexpr = False, GROUP: tl.constexpr = 1,
                          W_LEFT: tl.constexpr = False, FOLD: tl.constexpr = False):
    """h[p, f] = clamped SwiGLU of gate and up rows f of the tile's expert on token p // K_SLOTS. SPLIT: over
    this program's blocks of D only, gate and up stored to part[split, 0 | 1, p, f] for _swiglu_sum_kernel."""
    pdl_enter()
    tile = tl.program_id(1)
    split = tl.program_id(2)
    e = tl.load(tile_e_ptr + tile)
    if e < E:
        p = tl.load(pairs_ptr + tile * BM + tl.arange(0, BM))
        ok_m = p >= 0
        p = tl.where(ok_m, p, 0).to(tl.int64)
        f = tl.program_id(0) * BN + tl.arange(0, BN)
        rows = e * F + tl.minimum(f, F - 1)
        kb_lo = split * CHUNK
        kb_hi = tl.minimum(kb_lo + CHUNK, D // 32)
        g, u = _expert_dot(x_ptr + (p // K_SLOTS) * D, ok_m, gw_ptr, ge_ptr, uw_ptr, ue_ptr, rows, D, kb_lo, kb_hi,
                           BM, BN, NB, True, DOT_F32, F16, GROUP, W_LEFT, FOLD)  # fmt: skip
        ok = ok_m[:, None] & (f < F)[None, :]
        if SPLIT:
            out = part_ptr + (split * 2 * N_PAIRS + p)[:, None] * F + f[None, :]
            tl.store(out, g, mask=ok)
            tl.store(out + N_PAIRS * F, u, mask=ok)
        else:
            g = tl.minimum(g + tl.load(gb_ptr + rows)[None, :], limit)
            u = tl.minimum(tl.maximum(u + tl.load(ub_ptr + rows)[None, :], -limit), limit)
            h = (u + 1.0) * g * tl.sigmoid(alpha * g)
            tl.store(h_ptr + p[:, None] * F + f[None, :], h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["N_PAIRS"])
def _swiglu_sum_kernel(part_ptr, ids_ptr, gb_ptr, ub_ptr, h_ptr, F, N_PAIRS, limit, alpha, S: tl.constexpr,
                       BF: tl.constexpr):
    """h[p, f] = clamped SwiGLU of (sum over splits, in order, of part[s, 0 | 1, p, f]) + pair p's biases."""
    pdl_enter()
    p = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BF + tl.arange(0, BF)
    ok = f < F
    e = tl.load(ids_ptr + p).to(tl.int64)
    g = tl.load(gb_ptr + e * F + f, mask=ok, other=0.0)
    u = tl.load(ub_ptr + e * F + f, mask=ok, other=0.0)
    gs = tl.zeros([BF], dtype=tl.float32)
    us = tl.zeros([BF], dtype=tl.float32)
    for s in tl.static_range(S):
        gs += tl.load(part_ptr + ((2 * s) * N_PAIRS + p) * F + f, mask=ok, other=0.0)
        us += tl.load(part_ptr + ((2 * s + 1) * N_PAIRS + p) * F + f, mask=ok, other=0.0)
    g = tl.minimum(gs + g, limit)
    u = tl.minimum(tl.maximum(us + u, -limit), limit)
    h = (u + 1.0) * g * tl.sigmoid(alpha * g)
    tl.store(h_ptr + p * F + f, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _tiles_down_kernel(h_ptr, pairs_ptr, tile_e_ptr, w_ptr, dw_ptr, de_ptr, db_ptr, part_ptr, E, F, D, CHUNK,
                       BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, DOT_F32: tl.constexpr,
                       F16: tl.constexpr = False, GROUP: tl.constexpr = 1, W_LEFT: tl.constexpr = False,
                       FOLD: tl.constexpr = False):
    """part[p, split, d] = w[p] * (down rows d of the tile's expert . h[p] over the split's blocks of F
    (+ the bias in split 0))."""
    pdl_enter()
    tile = tl.program_id(1)
    split = tl.program_id(2)
    e = tl.load(tile_e_ptr + tile)
    if e < E:
        p = tl.load(pairs_ptr + tile * BM + tl.arange(0, BM))
        ok_m = p >= 0
        p = tl.where(ok_m, p, 0)
        d = tl.program_id(0) * BN + tl.arange(0, BN)
        rows = e * D + tl.minimum(d, D - 1)
        kb_lo = split * CHUNK
        kb_hi = tl.minimum(kb_lo + CHUNK, F // 32)
        bias = tl.load(db_ptr + rows)  # the epilogue's loads first: their latency hides behind the loop
        weight = tl.load(w_ptr + p, mask=ok_m, other=0.0).to(tl.float32)
        y, _ = _expert_dot(h_ptr + p.to(tl.int64) * F, ok_m, dw_ptr, de_ptr, dw_ptr, de_ptr, rows, F, kb_lo, kb_hi,
                           BM, BN, NB, False, DOT_F32, F16, GROUP, W_LEFT, FOLD)  # fmt: skip
        y += bias[None, :] * (split == 0)
        y *= weight[:, None]
        out = part_ptr + (p.to(tl.int64) * tl.num_programs(2) + split)[:, None] * D + d[None, :]
        tl.store(out, y, mask=ok_m[:, None] & (d < D)[None, :])


def tiles_config() -> dict:
    """Pairs a tile, rows a tile, blocks a step, and the program counts (per tile of pairs) that gate/up's and
    down's splits of their inputs aim for."""
    if INTERPRET:
        return {"BM": 16, "BN": 16, "NB": 2, "UP_TARGET": 1, "TARGET": 1, "num_warps": 1, "num_stages": 1,
                "F16": F16_TILES, "W_LEFT": W_LEFT, "FOLD": FOLD}
    # H200 sweep (bench/gpu_tune.py moe), us a layer, float16 tiles: T=1 84, T=4 212, T=16 382, T=64 514,
    # T=128 806 (bfloat16 tiles, NB=2: 102, 240, 437, 532, 803)
    # (W_LEFT: 4 warps, the warpgroup a wgmma with its left operand in registers needs)
    # scales folded (FOLD, session 7), NB=2, 4 warps: T=1 79, T=4 184, T=16 409, T=64 478, T=128 700 (the same
    # run's unfolded default: 92, 195, 421, 503, 745); x converted with saturation (one instruction a pair), fewer
    # splits (UP_TARGET 64, TARGET 256): 81, 149, 336, 447, 694
    # x read contiguous (session 9: the decoded tiles in element order), float16 x as GPT-OSS feeds it, 75 configs
    # (bench/gpu_tune.py sweep_moe): BN=64, 8 warps, UP_TARGET=64, TARGET=64: T=1 67.9, T=16 259.5, T=64 295.2 us
    # (the config before it: 73.6, 284.8, 339.2)
    # the splits of K chosen for BN=64 tiles (SPLIT_BN), the tiles 32 rows wide in 4 warps (session 10,
    # bench/gpu_tune.py small; bits do not depend on BN, warps or stages): T=1/4/16 66.8/139.7/234.7 -> 56.5/134.0/222.3
    fold = F16_TILES and FOLD
    if fold and not W_LEFT:
        return {"BM": 16, "BN": 32, "SPLIT_BN": 64, "NB": 2, "UP_TARGET": 64, "TARGET": 64, "num_warps": 4,
                "num_stages": 3, "F16": True, "W_LEFT": False, "FOLD": True}
    return {"BM": 16, "BN": 128, "NB": 2 if fold or not F16_TILES else 1, "UP_TARGET": 64 if fold else 256,
            "TARGET": 256 if fold else 1024,
            "num_warps": 4 if W_LEFT or fold else 2, "num_stages": 3, "F16": F16_TILES, "W_LEFT": W_LEFT, "FOLD": fold}



def moe_tiles(
    x: torch.Tensor,
    top_ids: torch.Tensor,
    top_w: torch.Tensor,
    gate: QuantTensor,
    gate_b: torch.Tensor,
    up: QuantTensor,
    up_b: torch.Tensor,
    down: QuantTensor,
    down_b: torch.Tensor,
    cfg: dict | None = None,
    limit: float = SWIGLU_LIMIT,
    alpha: float = SWIGLU_ALPHA,
    out: torch.Tensor | None = None,
    partials: bool = False,
) -> torch.Tensor | Partials:
    """moe_reference's function on tensor cores, for any number of tokens: x [T, D] -> y [T, D] (into `out`).
    partials: y as its k x splits partial rows a token (Partials, float32), summed by the consumer in the same
    order as _token_sums."""
    gp, upk, dp = _packed(gate, "gate"), _packed(up, "up"), _packed(down, "down")
    c = dict(cfg or tiles_config())
    BM, BN, NB, target = c.pop("BM"), c.pop("BN"), c.pop("NB"), c.pop("TARGET")
    up_target = c.pop("UP_TARGET", 1)
    f16, w_left, fold = c.pop("F16", False), c.pop("W_LEFT", False), c.pop("FOLD", False)
    split_bn = c.pop("SPLIT_BN", BN)  # the tile width the splits of K are chosen for (bits do not depend on BN)
    T, D = x.shape
    k = top_ids.shape[1]
    E, F, _ = gate.shape
    P = T * k
    pairs, tile_expert = route_tiles(top_ids, E, BM)
    n_tiles = tile_expert.numel()
    x = x.contiguous()
    gb, ub = gate_b.float().contiguous(), up_b.float().contiguous()
    fold = f16 and fold and gp.fold and upk.fold and dp.fold
    # folded tiles read float16 x as it is: h in float16 (|h| <= (limit + 1) * limit, well inside its range)
    h = torch.empty(P, F, dtype=torch.float16 if fold else x.dtype, device=x.device)
    tiles = triton.cdiv(F, BN)
    splits, chunk = split_k(D // 32, triton.cdiv(F, split_bn), NB, up_target)  # by shape, never by the pair count
    part = torch.empty(splits, 2, P, F, dtype=torch.float32, device=x.device) if splits > 1 else h
    _tiles_gate_up_kernel[(tiles, n_tiles, splits)](
        x, pairs, tile_expert, gp.codes, gp.scales, gb, upk.codes, upk.scales, ub, h, part, E, F, D, k, P, chunk,
        limit, alpha, BM=BM, BN=BN, NB=NB, DOT_F32=INTERPRET, SPLIT=splits > 1, F16=f16, GROUP=_group(gp, upk),
        W_LEFT=w_left, FOLD=fold, **c, **pdl_launch(),
    )  # fmt: skip
    if splits > 1:
        _swiglu_sum_kernel[(P, triton.cdiv(F, 1024))](part, top_ids.reshape(-1), gb, ub, h, F, P, limit, alpha,
                                                      S=splits, BF=1024, **pdl_launch())  # fmt: skip
    tiles = triton.cdiv(D, BN)
    splits, chunk = split_k(F // 32, triton.cdiv(D, split_bn), NB, target)  # by shape, never by the pair count
    part = torch.empty(T * k, splits, D, dtype=torch.float32, device=x.device)
    _tiles_down_kernel[(tiles, n_tiles, splits)](
        h, pairs, tile_expert, top_w.reshape(-1).float().contiguous(), dp.codes, dp.scales,
        down_b.float().contiguous(), part, E, F, D, chunk, BM=BM, BN=BN, NB=NB, DOT_F32=INTERPRET, F16=f16,
        GROUP=dp.group, W_LEFT=w_left, FOLD=fold, **c, **pdl_launch(),
    )  # fmt: skip
    if partials:
        R = k * splits
        return Partials(part, T, D, R, R * D, D, dtype=torch.float32)
    return _token_sums(part, T, x.dtype, out)


def moe_prefill(
    x: torch.Tensor,
    top_ids: torch.Tensor,
    top_w: torch.Tensor,
    gate: PackedWeight,
    gate_b: torch.Tensor,
    up: PackedWeight,
    up_b: torch.Tensor,
    down: PackedWeight,
    down_b: torch.Tensor,
    limit: float = SWIGLU_LIMIT,
    alpha: float = SWIGLU_ALPHA,
) -> torch.Tensor:
    """The MoE for a prompt chunk: every expert dequantized to bf16 once for the call (the chunk's thousands of
    pairs use most of them), then one `torch._grouped_mm` per matrix over the pairs sorted by expert, each
    expert's rows padded to GROUP_M. No host sync. [T, D] float32."""
    T, D = x.shape
    k = top_ids.shape[1]
    E, F = gate_b.shape
    pairs, tile_expert = group_pairs(top_ids, E)
    valid = pairs >= 0
    p = pairs.long().clamp(min=0)
    row_e = tile_expert.long().repeat_interleave(GROUP_M).clamp(max=E - 1)  # each padded row's expert
    offs = (torch.searchsorted(tile_expert, torch.arange(E, device=x.device), right=True) * GROUP_M).int()
    xs = (x.to(torch.bfloat16)[p // k]) * valid[:, None]  # [rows, D], padding rows zero

    def expert_mm(a: torch.Tensor, w: PackedWeight, n: int, kdim: int) -> torch.Tensor:
        wd = dequantize_packed(w, torch.bfloat16).view(E, n, kdim)
        return torch._grouped_mm(a, wd.transpose(-2, -1), offs=offs)

    g = expert_mm(xs, gate, F, D).float() + gate_b.float()[row_e]
    u = expert_mm(xs, up, F, D).float() + up_b.float()[row_e]
    h = clamped_swiglu(g, u, limit, alpha).to(torch.bfloat16)
    del g, u
    y = (expert_mm(h, down, D, F).float() + down_b.float()[row_e]) * top_w.reshape(-1).float()[p, None]
    part = torch.zeros(T * k + 1, D, dtype=torch.float32, device=x.device)  # the last row takes the padding
    part.index_copy_(0, torch.where(valid, p, T * k), y)
    out = torch.empty(T, D, dtype=torch.float32, device=x.device)
    sum_partials_kernel[(T, triton.cdiv(D, 1024))](part, out, D, k * D, D, R=k, BJ=1024, **pdl_launch())
    return out
