"""Attention over a KV cache: causal by position, optional sliding window, optional sinks, GQA."""

from __future__ import annotations

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
    mask: torch.Tensor,  # [T, L] bool
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
    gmask = mask.repeat(G, 1)
    if sinks is None and softcap is None:
        out = F.scaled_dot_product_attention(qg.to(k.dtype), k, v, attn_mask=gmask, scale=scale)
    else:
        scores = (qg.float() @ k.float().transpose(-1, -2)) * scale  # [Hkv, G*T, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
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


def cached_attention(
    q: torch.Tensor,  # [T, H, hd] (already rotated)
    k: torch.Tensor,  # [T, Hkv, hd] (already rotated)
    v: torch.Tensor,  # [T, Hkv, hdv]
    positions: torch.Tensor,  # [T]
    kv,  # engine.kv_cache.KVCache
    layer: int,
    seqs,  # list[engine.kv_cache.SeqSpan]
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Store each sequence's new K/V in its cache slot, then attend over everything it holds: [T, H, hdv]."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    for s in seqs:
        pos = positions[s.start : s.end]
        kv.write(layer, s.slot, pos, k[s.start : s.end], v[s.start : s.end])
        length = int(pos.max()) + 1
        K, V = kv.read(layer, s.slot, length)
        mask = attention_mask(pos, torch.arange(length, device=q.device), window)
        out[s.start : s.end] = attention(q[s.start : s.end], K, V, mask, scale, sinks=sinks, softcap=softcap)
    return out
