"""Attention over a KV cache: causal by position, optional sliding window, optional sinks, GQA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """allowed[t, l]: key position l is visible from query position t (causal, within the window)."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def attention(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [Hkv, L, hd]
    v: torch.Tensor,  # [Hkv, L, hdv]
    mask: torch.Tensor | None,  # [T, L] bool; None: every key is visible
    scale: float,
    sinks: torch.Tensor | None = None,  # [H] learned logit per head that joins the softmax denominator
    softcap: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention; returns [T, H, hdv]. Query head h reads KV head h // (H / Hkv)."""
    T, H, hd = q.shape
    Hkv = k.shape[0]
    G = H // Hkv
    # Fold the group into the query axis so K/V are never repeated: [Hkv, G*T, hd].
    qg = q.reshape(T, Hkv, G, hd).permute(1, 2, 0, 3).reshape(Hkv, G * T, hd)
    gmask = mask.repeat(G, 1) if mask is not None else None
    # SDPA for prefill and on GPU (one kernel); for a single CPU decode row its dispatch costs ~250 us,
    # ten times the three small ops below.
    if softcap is None and (T > 1 or q.is_cuda):
        if sinks is None:
            out = F.scaled_dot_product_attention(qg.to(k.dtype), k, v, attn_mask=gmask, scale=scale)
        else:
            sink = sinks.float().reshape(Hkv, G, 1).expand(Hkv, G, T).reshape(Hkv, G * T)
            out = fused_attention_with_sinks(qg.to(k.dtype), k, v, gmask, scale, sink)
    else:
        scores = (qg.float() @ k.float().transpose(-1, -2)) * scale  # [Hkv, G*T, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if gmask is not None:
            scores = scores.masked_fill(~gmask, float("-inf"))
        if sinks is not None:
            # The sink is one extra column per head: it takes probability mass, then is dropped.
            sink_col = sinks.float().reshape(Hkv, G, 1, 1).expand(Hkv, G, T, 1).reshape(Hkv, G * T, 1)
            scores = torch.cat([scores, sink_col], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        if sinks is not None:
            probs = probs[..., :-1]
        out = probs @ v.float()
    return out.reshape(Hkv, G, T, -1).permute(2, 0, 1, 3).reshape(T, H, -1).to(q.dtype)


def fused_attention_with_sinks(
    q: torch.Tensor,  # [Hkv, M, hd]
    k: torch.Tensor,  # [Hkv, L, hd]
    v: torch.Tensor,  # [Hkv, L, hdv]
    mask: torch.Tensor | None,  # [M, L] bool
    scale: float,
    sink: torch.Tensor,  # [Hkv, M] float32: each query row's sink logit
) -> torch.Tensor:
    """Attention whose softmax denominator also holds exp(sink), from a fused kernel that never materializes
    the [M, L] scores: with o and lse = logsumexp of the row's scores from the kernel,
    o_sink = o * e^lse / (e^lse + e^sink) = o * sigmoid(lse - sink). [Hkv, M, hdv]"""
    M, L = q.shape[1], k.shape[1]
    bias = None
    if mask is not None:  # an additive mask; rows padded to 16 columns as the CUDA kernel wants, then viewed back
        bias = torch.zeros(M, -(-L // 16) * 16, dtype=q.dtype, device=q.device)
        bias[:, :L].masked_fill_(~mask, float("-inf"))
        bias = bias[:, :L].expand(1, k.shape[0], M, L)
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q[None], k[None], v[None], bias, True, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], attn_mask=bias, scale=scale)
    lse = lse[0, :, :M].float()  # the CUDA kernel pads its rows
    return out[0] * torch.sigmoid(lse - sink)[..., None].to(out.dtype)


@dataclass
class SeqAttention:
    """One sequence's rows [start, end) of the batch, its KV slot, how many cached positions it sees."""

    start: int
    end: int
    slot: int
    length: int
    mask: torch.Tensor | None  # [rows, length]; None when a single new token sees every key


@dataclass
class AttentionPlan:
    """What every layer of one forward needs to attend, worked out once for the whole batch."""

    slots: torch.Tensor  # [T] the KV slot of each row
    positions: torch.Tensor  # [T]
    seqs: list[SeqAttention]


def plan_attention(positions: torch.Tensor, seqs, window: int | None, max_len: int) -> AttentionPlan:
    """Per-sequence lengths and masks for `seqs` (engine.kv_cache.SeqSpan), shared by all layers."""
    pos_list = positions.tolist()  # one host sync per forward, not per layer
    slots = torch.empty(len(pos_list), dtype=torch.long)
    plans = []
    for s in seqs:
        last = max(pos_list[s.start : s.end])
        if last >= max_len:
            raise ValueError(f"position {last} is past the KV cache length {max_len}")
        slots[s.start : s.end] = s.slot
        length = last + 1
        if s.end - s.start == 1 and (window is None or length <= window):
            mask = None
        else:
            k_pos = torch.arange(length, device=positions.device)
            mask = attention_mask(positions[s.start : s.end], k_pos, window)
        plans.append(SeqAttention(s.start, s.end, s.slot, length, mask))
    return AttentionPlan(slots.to(positions.device), positions, plans)


def cached_attention(
    q: torch.Tensor,  # [T, H, hd] (already rotated)
    k: torch.Tensor,  # [T, Hkv, hd] (already rotated)
    v: torch.Tensor,  # [T, Hkv, hdv]
    kv,  # engine.kv_cache.KVCache
    layer: int,
    plan: AttentionPlan,
    scale: float,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Store every row's new K/V in its sequence's cache slot, then attend each sequence over what its
    slot holds: [T, H, hdv]. Each sequence is computed on its own, so batching never changes its result."""
    kv.write_rows(layer, plan.slots, plan.positions, k, v)
    T, H, _ = q.shape
    out = q.new_empty(T, H, v.shape[-1])
    lean = q.device.type == "cpu" and q.dtype == kv.k[layer].dtype and sinks is None and softcap is None
    q_scaled = None
    for s in plan.seqs:
        K, V = kv.read(layer, s.slot, s.length)
        if lean and s.end - s.start == 1 and s.mask is None:
            # A CPU decode row: each op here costs a few microseconds of dispatch, so three ops, not ~15.
            if q_scaled is None:
                q_scaled = (q * scale).view(T, K.shape[0], H // K.shape[0], -1)
            scores = torch.bmm(q_scaled[s.start], K.transpose(1, 2))  # [Hkv, G, L]
            torch.bmm(torch.softmax(scores, dim=-1), V, out=out[s.start].view(K.shape[0], H // K.shape[0], -1))
        else:
            out[s.start : s.end] = attention(q[s.start : s.end], K, V, s.mask, scale, sinks=sinks, softcap=softcap)
    return out


def decode_mask(positions: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[B, length] bool for one new token per row at `positions` [B], built on the device (no host sync):
    with every sequence's keys at cache positions 0..length-1, later positions (stale or unwritten) are hidden."""
    return attention_mask(positions, torch.arange(length, device=positions.device), window)


def static_decode_attention(
    q: torch.Tensor,  # [B, H, hd] (already rotated), one new token per sequence
    k: torch.Tensor,  # [B, Hkv, hd] (already rotated)
    v: torch.Tensor,  # [B, Hkv, hdv]
    kv,  # engine.kv_cache.KVCache
    layer: int,
    slots: torch.Tensor,  # [B] each row's KV slot, on the device
    positions: torch.Tensor,  # [B] on the device
    mask: torch.Tensor,  # [B, length] from decode_mask
    scale: float,
    sinks: torch.Tensor | None = None,  # [H]
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention whose shapes depend only on (B, length), never on the positions' values, so a CUDA
    graph can hold it: write the new K/V, then attend over the first `length` cache positions of each slot.
    Returns [B, H, hdv]."""
    kv.write_rows(layer, slots, positions, k, v)
    length = mask.shape[1]
    K = kv.k[layer][slots, :, :length].float()  # [B, Hkv, L, hd] (a gather: slots live on the device)
    V = kv.v[layer][slots, :, :length].float()
    B, H, hd = q.shape
    Hkv = K.shape[1]
    G = H // Hkv
    qg = q.float().reshape(B, Hkv, G, hd)
    scores = torch.einsum("bkgd,bkld->bkgl", qg, K) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if sinks is not None:
        # The sink is one extra column per head: it takes probability mass, then is dropped.
        sink_col = sinks.float().reshape(1, Hkv, G, 1).expand(B, Hkv, G, 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bkgl,bkld->bkgd", probs, V)
    return out.reshape(B, H, -1).to(q.dtype)
