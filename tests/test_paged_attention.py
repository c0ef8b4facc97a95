"""The paged attention kernel (Triton) against kernels/attention.py's torch attention over each sequence's
gathered K/V, on fresh random pools whose block tables are shuffled."""

from collections import OrderedDict

import pytest
import torch

from tests.test_triton_quant import rel_err
from worker_orcd.engine.kv_cache import KVCache, SeqSpan
from worker_orcd.kernels.attention import attention, attention_mask, plan_attention
from worker_orcd.kernels.triton_attention import paged_attention


def random_cache(Hkv, hd, n_slots, max_len, page, device="cpu", dtype=torch.float32):
    kv = KVCache(1, Hkv, hd, max_len, n_slots, dtype, device, block_size=page)
    kv.blocks._free = OrderedDict.fromkeys(torch.randperm(kv.blocks.n_blocks).tolist())  # tables far from contiguous
    kv.k[0].copy_(torch.randn_like(kv.k[0], dtype=torch.float32))
    kv.v[0].copy_(torch.randn_like(kv.v[0], dtype=torch.float32))
    return kv


def reference(q, kv, seqs, positions, scale, sinks, softcap, window):
    out = torch.empty(q.shape[0], q.shape[1], kv.v[0].shape[-1], dtype=torch.float64)
    for s in seqs:
        length = int(positions[s.start : s.end].max()) + 1
        K, V = kv.read(0, s.slot, length)
        mask = attention_mask(positions[s.start : s.end], torch.arange(length), window)
        out[s.start : s.end] = attention(q[s.start : s.end].double(), K.double(), V.double(), mask, scale,
                                         sinks=None if sinks is None else sinks.double(), softcap=softcap)
    return out


CASES = [  # H, Hkv, hd, window, sinks, softcap
    (4, 2, 64, None, False, None),
    (6, 2, 32, 7, True, None),
    (3, 3, 96, None, False, 20.0),
    (8, 2, 64, 5, True, None),
]


@pytest.mark.parametrize("H,Hkv,hd,window,sinks,softcap", CASES)
def test_paged_attention_matches_torch(H, Hkv, hd, window, sinks, softcap):
    torch.manual_seed(0)
    kv = random_cache(Hkv, hd, n_slots=4, max_len=48, page=4)
    # a prefill chunk of 19 rows (two tiles) at positions 5..23, then three decode rows
    spans = [SeqSpan(2, 0, 19), SeqSpan(0, 19, 20), SeqSpan(3, 20, 21), SeqSpan(1, 21, 22)]
    positions = torch.tensor(list(range(5, 24)) + [40, 0, 17])
    q = torch.randn(22, H, hd)
    sink = torch.randn(H) if sinks else None
    plan = plan_attention(positions, spans, window, kv, kernel=True)
    out = torch.full((22, H, hd), float("nan"))
    t = plan.tiles
    for tile_row, tile_len, block_q in t.groups:
        paged_attention(q, kv.k[0], kv.v[0], kv.tables, t.row_slot, t.positions, tile_row, tile_len, block_q, 0.3,
                        sinks=sink, softcap=softcap, window=window, out=out)
    assert rel_err(out, reference(q, kv, spans, positions, 0.3, sink, softcap, window)) < 1e-5


def test_decode_rows_split_into_segments():
    """Flash-decoding segments merged in order give the one-pass result (sinks applied after the merge)."""
    torch.manual_seed(1)
    kv = random_cache(2, 32, n_slots=3, max_len=64, page=8)
    spans = [SeqSpan(s, s, s + 1) for s in range(3)]
    positions = torch.tensor([63, 9, 40])
    q, sink = torch.randn(3, 4, 32), torch.randn(4)
    t = plan_attention(positions, spans, None, kv, kernel=True).tiles
    rows, lens, bq = t.groups[0]
    one = paged_attention(q, kv.k[0], kv.v[0], kv.tables, t.row_slot, t.positions, rows, lens, bq, 0.2, sinks=sink)
    split = paged_attention(q, kv.k[0], kv.v[0], kv.tables, t.row_slot, t.positions, rows, lens, bq, 0.2, sinks=sink,
                            splits=(4, 16))
    assert rel_err(split, reference(q, kv, spans, positions, 0.2, sink, None, None)) < 1e-5
    assert rel_err(split, one) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv,hd,window,sinks,softcap", CASES + [(64, 8, 64, 128, True, None)])
def test_paged_attention_on_cuda_bf16(H, Hkv, hd, window, sinks, softcap):
    """bf16 pool and queries on the GPU (float32 accumulation) against float64; a decode row gives the same
    bits alone as among the others."""
    torch.manual_seed(0)
    kv = random_cache(Hkv, hd, n_slots=4, max_len=600, page=16, device="cuda", dtype=torch.bfloat16)
    spans = [SeqSpan(2, 0, 300), SeqSpan(0, 300, 301), SeqSpan(3, 301, 302), SeqSpan(1, 302, 303)]
    positions = torch.tensor(list(range(200, 500)) + [590, 0, 257])
    q = torch.randn(303, H, hd).cuda().bfloat16()
    sink = torch.randn(H).cuda() if sinks else None
    plan = plan_attention(positions.cuda(), spans, window, kv)
    t = plan.tiles
    out = torch.full((303, H, hd), float("nan"), device="cuda", dtype=torch.bfloat16)
    for tile_row, tile_len, block_q in t.groups:
        paged_attention(q, kv.k[0], kv.v[0], kv.tables, t.row_slot, t.positions, tile_row, tile_len, block_q, 0.3,
                        sinks=sink, softcap=softcap, window=window, splits=t.splits, out=out)
    cpu_kv = KVCache(1, Hkv, hd, 600, 4, torch.float32, "cpu", block_size=16)
    cpu_kv.blocks = kv.blocks
    cpu_kv.k[0].copy_(kv.k[0].float().cpu())
    cpu_kv.v[0].copy_(kv.v[0].float().cpu())
    want = reference(q.float().cpu(), cpu_kv, spans, positions, 0.3, None if sink is None else sink.cpu(), softcap,
                     window)
    assert rel_err(out.float().cpu(), want) < 1e-2
    alone = plan_attention(positions[301:302].cuda(), [SeqSpan(3, 0, 1)], window, kv).tiles
    one = paged_attention(q[301:302], kv.k[0], kv.v[0], kv.tables, alone.row_slot, alone.positions,
                          *alone.groups[0], 0.3, sinks=sink, softcap=softcap, window=window, splits=alone.splits)
    assert torch.equal(one[0], out[301])
