"""Paged attention (Triton): every row of a step in one launch, reading each sequence's own KV blocks.

A program takes one tile (up to BLOCK_Q consecutive query rows of one sequence) and one KV head, so the G
query heads that share the KV head ride along as extra rows: [BLOCK_Q * G, head_dim] against each key block.
Keys are visited in absolute blocks of BLOCK_K positions from the start of the sequence (or of the sliding
window), with an online softmax; a block a row cannot see changes nothing, so a row's result depends only
on its own sequence, never on the tile or the batch around it. Decode tiles (one row) may split the keys
into fixed segments of `seg_len` positions (flash-decoding) that a second kernel merges in order; where the
segments fall depends only on the cache, so a split changes nothing about batch invariance either.
Sinks (GPT-OSS) join the softmax denominator at the end: l += exp(sink - m).

The torch reference is kernels/attention.py's `attention` over the gathered K/V of each sequence.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.pdl import pdl_enter, pdl_launch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634


# T (rows in the step) is not specialized on: a new value mid-serving would recompile
@triton.jit(do_not_specialize=["T"])
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ml_ptr,
    tile_row_ptr, tile_len_ptr, row_slot_ptr, pos_ptr, tables_ptr, sinks_ptr,
    scale, softcap, window, seg_len, T,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kh, stride_vb, stride_vh, stride_table,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    pdl_enter()
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row0 = tl.load(tile_row_ptr + tile)
    n = tl.load(tile_len_ptr + tile)
    m = tl.arange(0, BLOCK_M)
    t = m // G
    valid = (t < n) & (m < BLOCK_Q * G)
    row = row0 + tl.where(valid, t, 0)
    head = kvh * G + m % G
    pos = tl.load(pos_ptr + row)
    slot = tl.load(row_slot_ptr + row0)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=valid[:, None] & (d[None, :] < D), other=0.0)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    hi = tl.max(tl.where(valid, pos, 0)) + 1  # keys [lo, hi) cover every row of the tile
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(tl.min(tl.where(valid, pos, 2**30)) - window + 1, 0)
    if SPLITS > 1:
        lo = tl.maximum(lo, split * seg_len)
        hi = tl.minimum(hi, (split + 1) * seg_len)
    qk_scale = scale * 1.4426950408889634  # exp2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for start in range(lo // BLOCK_K * BLOCK_K, hi, BLOCK_K):
        kpos = start + kk
        in_seq = kpos < hi
        blk = tl.load(tables_ptr + slot * stride_table + kpos // PAGE, mask=in_seq, other=0)
        off = kpos % PAGE
        kb = blk.to(tl.int64) * stride_kb + kvh * stride_kh + off * D
        k = tl.load(k_ptr + kb[:, None] + d[None, :], mask=in_seq[:, None] & (d[None, :] < D), other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_K] float32
        if HAS_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s * scale / softcap) - 1.0) * 1.4426950408889634
        else:
            s = s * qk_scale
        allowed = (kpos[None, :] <= pos[:, None]) & in_seq[None, :] & (kpos[None, :] >= lo)
        if HAS_WINDOW:
            allowed = allowed & (pos[:, None] - kpos[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = blk.to(tl.int64) * stride_vb + kvh * stride_vh + off * DV
        v = tl.load(v_ptr + vb[:, None] + dv[None, :], mask=in_seq[:, None] & (dv[None, :] < DV), other=0.0)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out_mask = valid[:, None] & (dv[None, :] < DV)
    if SPLITS > 1:  # partial results: acc unnormalized, (m, l) in the exp2 domain
        base = (split * T + row) * H + head
        tl.store(o_ptr + base[:, None] * DV + dv[None, :], acc, mask=out_mask)
        tl.store(ml_ptr + base * 2, m_i, mask=valid)
        tl.store(ml_ptr + base * 2 + 1, l_i, mask=valid)
    else:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
            m_fin = tl.maximum(m_i, sink)
            l_i = l_i * tl.math.exp2(m_i - m_fin) + tl.math.exp2(sink - m_fin)
            acc = acc * tl.math.exp2(m_i - m_fin)[:, None]
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=out_mask)  # fmt: skip


@triton.jit(do_not_specialize=["T"])
def _merge_kernel(
    part_ptr, ml_ptr, sinks_ptr, o_ptr, tile_row_ptr, T, stride_ot, stride_oh,
    H: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, SPLITS: tl.constexpr, HAS_SINKS: tl.constexpr,
):  # fmt: skip
    """out[t, h] from the SPLITS partial (acc, m, l) of row t (one-row tile), head h, merged in split order."""
    pdl_enter()
    t = tl.load(tile_row_ptr + tl.program_id(0))
    h = tl.program_id(1)
    dv = tl.arange(0, BLOCK_DV)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        base = (s * T + t) * H + h
        m_s = tl.load(ml_ptr + base * 2)
        l_s = tl.load(ml_ptr + base * 2 + 1)
        a_s = tl.load(part_ptr + base * DV + dv, mask=dv < DV, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.math.exp2(m_i - m_safe)
        w_s = tl.math.exp2(m_s - m_safe)
        l_i = l_i * w_old + l_s * w_s
        acc = acc * w_old + a_s * w_s
        m_i = m_new
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_fin = tl.maximum(m_i, sink)
        l_i = l_i * tl.math.exp2(m_i - m_fin) + tl.math.exp2(sink - m_fin)
        acc = acc * tl.math.exp2(m_i - m_fin)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + dv, out.to(o_ptr.dtype.element_ty), mask=dv < DV)


def decode_splits(max_len: int, block_k: int = 64) -> tuple[int, int]:
    """(splits, seg_len) for one-row tiles: at most 16 segments of whole key blocks, fixed by the cache length."""
    if INTERPRET:
        return 1, max_len
    seg = max(4 * block_k, -(-max_len // 16))
    seg = -(-seg // block_k) * block_k
    return -(-max_len // seg), seg


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_pool: torch.Tensor,  # [blocks, Hkv, page, D]
    v_pool: torch.Tensor,  # [blocks, Hkv, page, DV]
    tables: torch.Tensor,  # [slots, max_blocks] int32
    row_slot: torch.Tensor,  # [T] int32: each row's sequence slot
    positions: torch.Tensor,  # [T] int32
    tile_row: torch.Tensor,  # [tiles] int32: first row of each tile
    tile_len: torch.Tensor,  # [tiles] int32: rows in each tile (all of one sequence, consecutive)
    block_q: int,  # the most rows a tile holds (1 for decode tiles)
    scale: float,
    sinks: torch.Tensor | None = None,  # [H]
    softcap: float | None = None,
    window: int | None = None,
    splits: tuple[int, int] = (1, 0),  # (splits, seg_len) for one-row tiles (decode_splits)
    out: torch.Tensor | None = None,  # [T, H, DV], rows outside the tiles are left as they are
) -> torch.Tensor:
    T, H, D = q.shape
    _, Hkv, page, _ = k_pool.shape
    DV = v_pool.shape[-1]
    G = H // Hkv
    out = torch.empty(T, H, DV, dtype=q.dtype, device=q.device) if out is None else out
    n_tiles = tile_row.shape[0]
    if n_tiles == 0:
        return out
    n_splits, seg_len = splits if block_q == 1 else (1, 0)
    block_k = 16 if INTERPRET else (64 if max(D, DV) <= 128 else 32)
    block_m = max(16, triton.next_power_of_2(block_q * G))
    part = ml = out
    if n_splits > 1:
        part = torch.empty(n_splits, T, H, DV, dtype=torch.float32, device=q.device)
        ml = torch.empty(n_splits, T, H, 2, dtype=torch.float32, device=q.device)
    sink_arg = sinks if sinks is not None else q
    num_warps = 1 if INTERPRET else (4 if block_m <= 64 else 8)
    _attn_kernel[(n_tiles, Hkv, n_splits)](
        q, k_pool, v_pool, part if n_splits > 1 else out, ml, tile_row, tile_len, row_slot, positions, tables,
        sink_arg, scale, softcap or 0.0, window or 0, seg_len, T,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), tables.stride(0),
        H=H, G=G, D=D, DV=DV, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV), PAGE=page,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_K=block_k, SPLITS=n_splits,
        HAS_SINKS=sinks is not None and n_splits == 1, HAS_SOFTCAP=softcap is not None,
        HAS_WINDOW=window is not None, DOT_F32=INTERPRET or q.dtype == torch.float32, num_warps=num_warps,
        **pdl_launch(),
    )  # fmt: skip
    if n_splits > 1:
        _merge_kernel[(n_tiles, H)](
            part, ml, sink_arg, out, tile_row, T, out.stride(0), out.stride(1), H=H, DV=DV,
            BLOCK_DV=triton.next_power_of_2(DV), SPLITS=n_splits, HAS_SINKS=sinks is not None,
            num_warps=1 if INTERPRET else 2, **pdl_launch(),
        )  # fmt: skip
    return out
