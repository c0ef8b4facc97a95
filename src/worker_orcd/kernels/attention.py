"""Attention over a KV cache: causal by position, optional sliding window, optional sinks, GQA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker_orcd.engine.transfer import to_device


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
    if T > 1 and not q.is_cuda:
        return blocked_attention(q, k, v, mask, scale, sinks, softcap)
    # Fold the group into the query axis so K/V are never repeated: [Hkv, G*T, hd].
    qg = q.reshape(T, Hkv, G, hd).permute(1, 2, 0, 3).reshape(Hkv, G * T, hd)
    gmask = mask.repeat(G, 1) if mask is not None else None
    # SDPA on GPU (one kernel); for a single CPU decode row its dispatch costs ~250 us, ten times the three
    # small ops below.
    if softcap is None and q.is_cuda:
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


KEY_BLOCK = 128  # CPU prompt attention reads keys in blocks of exactly this many (the last one padded, masked)
ROW_TILE = 16  # and query rows in tiles of this many: MKL's sgemm sums another way for a few rows


def blocked_attention(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [Hkv, L, hd]
    v: torch.Tensor,  # [Hkv, L, hdv]
    mask: torch.Tensor | None,  # [T, L] bool; None: every key is visible
    scale: float,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention (CPU) whose rows do not depend on how many keys the call reads past their own nor on which
    other rows it holds, so a prompt computed whole, in chunks, after a cached prefix or over a longer masked
    range gives the same bits: every op sees KEY_BLOCK keys and whole row tiles, masked keys add exact zeros,
    and the blocks merge by an online softmax in key order. A block is computed only for the row tiles that
    see it (causal: about half the work of one dense masked call). [T, H, hdv]"""
    T, H, hd = q.shape
    Hkv, L = k.shape[:2]
    G, hdv = H // Hkv, v.shape[-1]
    dt = torch.promote_types(k.dtype, torch.float32)
    Tp, Lp = -(-T // ROW_TILE) * ROW_TILE, -(-L // KEY_BLOCK) * KEY_BLOCK
    # rows in (position, group) order: the rows from a tile on are one slice [Hkv, rows * G, hd]
    qg = q.new_zeros(Hkv, Tp, G, hd, dtype=dt)  # padding rows see no key and are dropped
    qg[:, :T] = (q.to(dt) * scale).reshape(T, Hkv, G, hd).transpose(0, 1)
    qg = qg.view(Hkv, Tp * G, hd)
    allowed = torch.zeros(Tp, Lp, dtype=torch.bool, device=q.device)
    allowed[:T, :L] = True if mask is None else mask
    tiles = allowed.view(Tp // ROW_TILE, ROW_TILE, Lp // KEY_BLOCK, KEY_BLOCK)
    seen, full = tiles.any(3).any(1).T.tolist(), tiles.all(3).all(1).T.tolist()  # [block][row tile]
    m = l = acc = None  # running max, denominator and output
    for b in range(Lp // KEY_BLOCK):
        seeing = [i for i, x in enumerate(seen[b]) if x]
        if not seeing:
            continue
        t0, t1 = seeing[0] * ROW_TILE, (seeing[-1] + 1) * ROW_TILE
        rows, keys = slice(t0 * G, t1 * G), slice(b * KEY_BLOCK, (b + 1) * KEY_BLOCK)
        kb, vb = k[:, keys].to(dt), v[:, keys].to(dt)
        if kb.shape[1] < KEY_BLOCK:
            kb, vb = (F.pad(t, (0, 0, 0, KEY_BLOCK - t.shape[1])) for t in (kb, vb))
        s = torch.bmm(qg[:, rows], kb.transpose(1, 2))  # [Hkv, (t1 - t0) * G, KEY_BLOCK]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if not all(full[b][seeing[0] : seeing[-1] + 1]):
            s.view(Hkv, t1 - t0, G, KEY_BLOCK).masked_fill_(~allowed[t0:t1, None, keys], float("-inf"))
        if m is None:  # the merge below from m = -1e30, l = acc = 0, in fewer ops
            m = qg.new_full((Hkv, Tp * G, 1), -1e30)  # finite: a row that sees none of a block keeps its state
            m[:, rows] = torch.clamp_min(s.amax(-1, keepdim=True), -1e30)
            p = s.sub_(m[:, rows]).exp_()
            l, acc = qg.new_zeros(Hkv, Tp * G, 1), qg.new_zeros(Hkv, Tp * G, hdv)
            l[:, rows], acc[:, rows] = p.sum(-1, keepdim=True), torch.bmm(p, vb)
            continue
        m_old = m[:, rows]
        m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))
        p = s.sub_(m_new).exp_()
        alpha = (m_old - m_new).exp_()
        l[:, rows] = l[:, rows] * alpha + p.sum(-1, keepdim=True)
        acc[:, rows] = acc[:, rows] * alpha + torch.bmm(p, vb)
        m[:, rows] = m_new
    if sinks is not None:  # the sink joins the denominator last, as one more key with no value
        sink = sinks.to(dt).reshape(Hkv, 1, G, 1).expand(Hkv, Tp, G, 1).reshape(Hkv, Tp * G, 1)
        m_new = torch.maximum(m, sink)
        alpha = (m - m_new).exp_()
        l = l * alpha + (sink - m_new).exp_()
        acc = acc * alpha
    out = (acc[:, : T * G] / l[:, : T * G]).view(Hkv, T, G, hdv)
    return out.transpose(0, 1).reshape(T, H, hdv).to(q.dtype)


def fused_attention_with_sinks(
    q: torch.Tensor,  # [Hkv, M, hd]
    k: torch.Tensor,  # [Hkv, L, hd]
    v: torch.Tensor,  # [Hkv, L, hdv]
    mask: torch.Tensor | None,  # [M, L] bool
    scale: float,
    sink: torch.Tensor,  # [Hkv, M] float32: each query row's sink logit
) -> torch.Tensor:
    """Attention whose softmax denominator also holds exp(sink), from a fused CUDA kernel that never materializes
    the [M, L] scores: with o and lse = logsumexp of the row's scores from the kernel,
    o_sink = o * e^lse / (e^lse + e^sink) = o * sigmoid(lse - sink). [Hkv, M, hdv]"""
    M, L = q.shape[1], k.shape[1]
    bias = None
    if mask is not None:  # an additive mask; rows padded to 16 columns as the CUDA kernel wants, then viewed back
        bias = torch.zeros(M, -(-L // 16) * 16, dtype=q.dtype, device=q.device)
        bias[:, :L].masked_fill_(~mask, float("-inf"))
        bias = bias[:, :L].expand(1, k.shape[0], M, L)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q[None], k[None], v[None], bias, True, scale=scale)[:2]
    lse = lse[0, :, :M].float()  # the CUDA kernel pads its rows
    return out[0] * torch.sigmoid(lse - sink)[..., None].to(out.dtype)


@dataclass
class SeqAttention:
    """One sequence's rows [start, end) of the batch, its KV slot, how many cached positions it reads."""

    start: int
    end: int
    slot: int
    length: int
    mask: torch.Tensor | None  # [rows, length]; None when a single new token sees every key


@dataclass
class KernelTiles:
    """The paged attention kernel's inputs for one forward (device tensors), shared by every layer."""

    row_slot: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32
    groups: list[tuple[torch.Tensor, torch.Tensor, int]]  # (tile_row, tile_len, block_q) per launch
    splits: tuple[int, int]  # decode tiles' key segments (triton_attention.decode_splits)


@dataclass
class AttentionPlan:
    """What every layer of one forward needs to attend, worked out once for the whole batch."""

    blocks: torch.Tensor  # [T] the KV block each new row is written to
    offsets: torch.Tensor  # [T] and its offset in that block
    seqs: list[SeqAttention]  # per sequence (the torch path); masks only where it needs them
    window: int | None = None
    tiles: KernelTiles | None = None  # set where the Triton kernel attends (CUDA)
    rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots, positions) of a static step without the kernel


PREFILL_TILE = 16  # query rows of one sequence per program of the paged kernel


def plan_attention(positions: torch.Tensor, seqs, window: int | None, kv, kernel: bool | None = None) -> AttentionPlan:
    """Blocks for every sequence in `seqs` (engine.kv_cache.SeqSpan) prepared in `kv`, where each new row
    goes, and per-sequence lengths (and masks for the torch path). kernel=None: the Triton kernel on CUDA."""
    return window_variants(positions, seqs, kv, (window,), kernel)[window]


def window_variants(positions: torch.Tensor, seqs, kv, windows, kernel: bool | None = None) -> dict:
    """{window: AttentionPlan} for each window in `windows` (None: full attention), sharing one preparation."""
    pos_list = positions.tolist()  # host positions (the caller's, before they moved): no sync
    kernel = kv.device.type == "cuda" if kernel is None else kernel
    row_slot = [0] * len(pos_list)
    lengths = []
    for s in seqs:
        length = max(pos_list[s.start : s.end]) + 1
        kv.prepare(s.slot, length)
        row_slot[s.start : s.end] = [s.slot] * (s.end - s.start)
        lengths.append(length)
    blocks, offsets = kv.locate(row_slot, pos_list)
    dev = kv.device
    # one copy; both rows start 16-byte aligned whatever the row count (Triton compiles a variant per alignment)
    pad = [0] * (len(pos_list) % 2)
    where = to_device([blocks + pad, offsets + pad], dev, torch.long)[:, : len(pos_list)]
    tiles = _kernel_tiles(pos_list, row_slot, seqs, kv) if kernel else None
    plans = {}
    for window in windows:
        per_seq = []
        for s, length in zip(seqs, lengths):
            mask = None
            if not kernel and (s.end - s.start > 1 or (window is not None and length > window)):
                k_pos = torch.arange(length, device=positions.device)
                mask = attention_mask(positions[s.start : s.end], k_pos, window).to(dev)
            per_seq.append(SeqAttention(s.start, s.end, s.slot, length, mask))
        plans[window] = AttentionPlan(where[0], where[1], per_seq, window, tiles)
    return plans


def _kernel_tiles(pos_list: list[int], row_slot: list[int], seqs, kv) -> KernelTiles:
    """One-row sequences become decode tiles, longer spans tiles of PREFILL_TILE rows (two launches)."""
    from worker_orcd.kernels.triton_attention import decode_splits

    decode_rows, prefill_rows, prefill_lens = [], [], []
    for s in seqs:
        if s.end - s.start == 1:
            decode_rows.append(s.start)
        for r in range(s.start, s.end, PREFILL_TILE) if s.end - s.start > 1 else ():
            prefill_rows.append(r)
            prefill_lens.append(min(PREFILL_TILE, s.end - r))
    # one host-to-device copy; every section starts 16-byte aligned, so the kernels see the same pointer
    # alignment whatever the row counts (Triton would compile a variant per alignment)
    parts = [row_slot, pos_list, decode_rows, prefill_rows, prefill_lens]
    starts, flat = [], []
    for part in parts:
        starts.append(len(flat))
        flat += part + [0] * (-len(part) % 4)
    meta = to_device(flat, kv.device, torch.int32)
    T, nd, npf = len(pos_list), len(decode_rows), len(prefill_rows)
    groups = []
    if nd:
        groups.append((meta[starts[2] : starts[2] + nd], torch.ones(nd, dtype=torch.int32, device=kv.device), 1))
    if npf:
        groups.append((meta[starts[3] : starts[3] + npf], meta[starts[4] : starts[4] + npf], PREFILL_TILE))
    return KernelTiles(meta[:T], meta[starts[1] : starts[1] + T], groups, decode_splits(kv.max_len))


def decode_plans(kv, slots: torch.Tensor, positions: torch.Tensor, windows, kernel: bool | None = None) -> dict:
    """{window: AttentionPlan} for one new row per sequence, from device tensors alone (no host sync), so a
    CUDA graph can hold it; the blocks must be prepared (kv.prepare) before each step."""
    bs = kv.block_size
    blocks = kv.tables[slots, torch.div(positions, bs, rounding_mode="floor")].long()
    if not (kv.device.type == "cuda" if kernel is None else kernel):
        return {w: AttentionPlan(blocks, positions % bs, [], w, rows=(slots, positions)) for w in windows}
    from worker_orcd.kernels.triton_attention import decode_splits

    B = slots.shape[0]
    rows = torch.arange(B, dtype=torch.int32, device=slots.device)
    tiles = KernelTiles(slots.int(), positions.int(), [(rows, torch.ones_like(rows), 1)], decode_splits(kv.max_len))
    return {w: AttentionPlan(blocks, positions % bs, [], w, tiles) for w in windows}


def gathered_attention(
    q: torch.Tensor,  # [B, H, hd], one new row per sequence
    kv,
    layer: int,
    slots: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B]
    window: int | None,
    scale: float,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The static step's attention in torch (no kernel, no host sync): every row over all of its table's
    blocks, positions past its own masked. [B, H, hdv]"""
    tables = kv.tables[slots].long()  # [B, max_blocks]; unused entries point at block 0 and are masked
    K = kv.k[layer][tables].float()  # [B, nb, Hkv, bs, hd]
    V = kv.v[layer][tables].float()
    B, nb, Hkv, bs, hd = K.shape
    K = K.permute(0, 2, 1, 3, 4).reshape(B, Hkv, nb * bs, hd)
    V = V.permute(0, 2, 1, 3, 4).reshape(B, Hkv, nb * bs, -1)
    mask = attention_mask(positions, torch.arange(nb * bs, device=positions.device), window)  # [B, L]
    G = q.shape[1] // Hkv
    scores = torch.einsum("bkgd,bkld->bkgl", q.float().reshape(B, Hkv, G, hd), K) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if sinks is not None:  # the sink is one extra column per head: it takes probability mass, then is dropped
        scores = torch.cat([scores, sinks.float().reshape(1, Hkv, G, 1).expand(B, Hkv, G, 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.einsum("bkgl,bkld->bkgd", probs, V).reshape(B, q.shape[1], -1).to(q.dtype)


def cached_attention(
    q: torch.Tensor,  # [T, H, hd] (already rotated)
    k: torch.Tensor | None,  # [T, Hkv, hd] (already rotated); None: already stored (rope.rotate_qkv)
    v: torch.Tensor | None,  # [T, Hkv, hdv]
    kv,  # engine.kv_cache.KVCache
    layer: int,
    plan: AttentionPlan,
    scale: float,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Store every row's new K/V in its sequence's blocks, then attend each sequence over what it holds:
    [T, H, hdv]. Each sequence is computed on its own, so batching never changes its result."""
    if k is not None:
        kv.write_rows(layer, plan.blocks, plan.offsets, k, v)
    T, H, _ = q.shape
    hdv = kv.v[layer].shape[-1]
    if plan.rows is not None:
        return gathered_attention(q, kv, layer, *plan.rows, plan.window, scale, sinks=sinks, softcap=softcap)
    if plan.tiles is not None:
        from worker_orcd.kernels.triton_attention import paged_attention

        t = plan.tiles
        q = q.to(kv.dtype)
        out = q.new_empty(T, H, hdv)
        for tile_row, tile_len, block_q in t.groups:
            paged_attention(q, kv.k[layer], kv.v[layer], kv.tables, t.row_slot, t.positions, tile_row, tile_len,
                            block_q, scale, sinks=sinks, softcap=softcap, window=plan.window, splits=t.splits,
                            out=out)
        return out
    out = q.new_empty(T, H, hdv)
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
