"""The mma decode kernels (mma_decode.cu; kernels/cuda_moe.py, cuda_dense.py): the MoE decode's bit arithmetic
on CPU against the packed layout, and on CUDA the kernels against the float64 reference, batch invariance, and
the switch that falls back to the Triton tiles."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from tests.test_triton_moe import experts, routes
from tests.test_triton_quant import random_blocks, rel_err
from worker_orcd.kernels import cuda_moe, triton_moe
from worker_orcd.quant import QuantTensor
from worker_orcd.quant.gpu_matmul import packed


def decode_like_the_kernel(words: torch.Tensor) -> torch.Tensor:
    """mma_decode.cu's decode() on int64 words -> float [..., 4 slots, 2 halves]: the f16 pairs it builds, as
    values (E2M1 value * 2^-14)."""
    w = words & 0xFFFFFFFF
    pairs = [
        (w << 9) & 0x8E008E00,
        (w << 6) & 0x8E008E00,
        ((w >> 1) & 0x0E000E00) | ((w << 8) & 0x80008000),
        ((w >> 4) & 0x0E000E00) | ((w << 7) & 0x80008000),
    ]
    p = torch.stack(pairs, -1) & 0xFFFFFFFF
    halves = torch.stack([p & 0xFFFF, p >> 16], -1).to(torch.int16)  # wraps like the bits
    return halves.view(torch.float16).float()


def test_decode_gives_each_word_its_elements_in_pairs():
    """Word i of a block -> slot s, half h = element 8i + 2s + h, times 2^-14: what an A fragment register holds."""
    raw = random_blocks(T.MXFP4, 64, 256)
    p = QuantTensor(raw, T.MXFP4, (64, 256))
    pw = packed(p)
    assert pw.group == 64  # the row groups the kernels index; row_by_row() below undoes them
    want = p.dequantize(torch.float32)  # [64, 256]
    words = pw.row_by_row().codes.to(torch.int64).reshape(64, 8, 4)  # [rows, blocks, word i]
    got = decode_like_the_kernel(words)  # [rows, blocks, i, s, h]
    scale = torch.exp2(pw.scales.to(torch.float32) - 127.0)[:, :, None, None, None] * 16384.0
    got = (got * scale).reshape(64, 8, 4, 4, 2)
    i, s, h = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(2), indexing="ij")
    elem = (8 * i + 2 * s + h).reshape(-1)
    vals = torch.empty(64, 8, 32)
    vals[:, :, elem] = got.reshape(64, 8, -1)
    assert torch.equal(vals.reshape(64, 256), want)


def test_q8_decode_gives_each_word_its_elements_in_pairs():
    """q8_gemm's q8_pair() on a word and on the word >> 8: bytes 0 and 2, then 1 and 3, as f16 values less 1152 =
    elements 4i, 4i + 1, then 4i + 2, 4i + 3 of word i (the pairs an A fragment register holds)."""
    from worker_orcd.quant import dequantize
    from worker_orcd.quant.packed import pack_q8_0

    raw = random_blocks(T.Q8_0, 16, 128)
    p = pack_q8_0(raw, 16, 128)
    w = p.codes.to(torch.int64) & 0xFFFFFFFF  # [rows, K/4]
    pairs = []
    for v in (w, w >> 8):
        h = ((v & 0x00FF00FF) ^ 0x64806480).to(torch.int64)
        halves = torch.stack([h & 0xFFFF, h >> 16], -1).to(torch.int16).view(torch.float16).float() - 1152.0
        pairs.append(halves)  # [rows, K/4, 2]
    got = torch.stack(pairs, -2).reshape(16, 128)  # word i: (4i, 4i + 1), (4i + 2, 4i + 3)
    want = dequantize(raw, T.Q8_0, (16, 128)) / p.scales.float().repeat_interleave(32, 1)
    assert torch.equal(got, want.round())
    assert torch.allclose(got, want, atol=1e-3)


def test_not_usable_off_cuda_or_switched_off(monkeypatch):
    g, gb, u, ub, d, db = experts(2, 64, 64, "cpu")
    ws = [packed(w) for w in (g, u, d)]
    assert not cuda_moe.usable(torch.zeros(1, 64), *ws)
    monkeypatch.setenv("WORKER_ORCD_CUDA_MOE", "0")
    assert not cuda_moe.usable(torch.zeros(1, 64), *ws)


def run(x, ids, w, ex, direct):
    g, gb, u, ub, d, db = ex
    tiles = None if direct else triton_moe.route_tiles(ids, gb.shape[0], cuda_moe.PAIRS)
    part = cuda_moe.moe_mma(x, ids, w, tiles, packed(g), gb, packed(u), ub, packed(d), db, 7.0, 1.702)
    return part.reshape(x.shape[0], ids.shape[1], -1).sum(1)


@pytest.mark.gpu
@pytest.mark.parametrize("T_", [1, 3, 9, 40, 128])
def test_mma_moe_matches_reference_and_the_batch(T_):
    """GPT-OSS-20B shapes: error against float64 (x in float16, as GPT-OSS feeds it); a token's bits alone =
    among T_; a pair's bits in a CTA of its own = in a tile (so the direct mode and tiles may alternate)."""
    ex = experts(32, 2880, 2880, "cuda")
    x = (torch.randn(T_, 2880, device="cuda") * 0.5).half()
    ids, w = routes(T_, 32, 4, "cuda")
    g, gb, u, ub, d, db = ex
    assert cuda_moe.usable(x, packed(g), packed(u), packed(d))
    got = run(x, ids, w, ex, direct=False)
    n = min(T_, 3)
    assert rel_err(got[:n], triton_moe.moe_reference(x[:n], ids[:n], w[:n], *ex)) < 5e-4
    assert torch.equal(run(x[:1], ids[:1], w[:1], ex, direct=True)[0], got[0])
    assert torch.equal(run(x, ids, w, ex, direct=True), got)
    y = triton_moe.moe_grouped(x, ids, w, *ex)  # the model's entry point takes the mma kernels
    assert torch.equal(y, got) or rel_err(y, got) < 1e-6  # the sums' order: part.sum vs the in-order kernel


@pytest.mark.gpu
def test_switch_falls_back_to_the_triton_tiles(monkeypatch):
    ex = experts(32, 2880, 2880, "cuda")
    x = torch.randn(2, 2880, device="cuda").half()
    ids, w = routes(2, 32, 4, "cuda")
    monkeypatch.setenv("WORKER_ORCD_CUDA_MOE", "0")
    y = triton_moe.moe_grouped(x, ids, w, *ex)
    assert torch.equal(y, triton_moe.moe_tiles(x, ids, w, *ex, out=torch.empty(2, 2880, device="cuda")))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 9, 128])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_dense_q8_matches_reference_and_the_batch(M, x_dtype):
    """q8_gemm on GPT-OSS's q|k|v shape: float64 from the dequantized weight and x rounded to float16 (what the
    kernel multiplies); a row alone = among M; the bias added; quant_matmul takes it."""
    from worker_orcd.kernels import cuda_dense
    from worker_orcd.kernels.triton_quant import quant_matmul
    from worker_orcd.quant import dequantize
    from worker_orcd.quant.packed import pack_q8_0

    n, k = 5120, 2880
    raw = random_blocks(T.Q8_0, n, k, "cuda")
    p = pack_q8_0(raw, n, k)
    x = torch.randn(M, k, device="cuda").to(x_dtype)
    bias = torch.randn(n, device="cuda")
    y = torch.full((M, n), float("nan"), device="cuda")
    assert cuda_dense.usable(p, x, y)
    got = cuda_dense.q8_matmul(p, x, y, bias)
    want = x.half().double() @ dequantize(raw, T.Q8_0, (n, k)).double().T + bias.double()
    assert rel_err(got, want) < 1e-5
    alone = cuda_dense.q8_matmul(p, x[-1:], torch.empty(1, n, device="cuda"), bias)
    assert torch.equal(alone[0], got[-1])
    assert torch.equal(quant_matmul(p, x, bias=bias, out_dtype=torch.float32), got)
