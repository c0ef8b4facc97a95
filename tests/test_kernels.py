"""Kernel references against float64 math written out independently, on fresh random inputs."""

import math

import pytest
import torch

from worker_orcd.kernels.activations import clamped_swiglu, geglu, gelu, swiglu
from worker_orcd.kernels.attention import attention, attention_mask
from worker_orcd.kernels.embedding import absolute_position_embedding
from worker_orcd.kernels.norm import layer_norm, rms_norm
from worker_orcd.kernels.rope import RopeConfig, apply_rope, cos_sin, inv_freq


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", [(1, 7), (5, 576), (3, 2, 1000)])
def test_rms_norm(shape):
    x, w = torch.randn(shape) * 30, torch.randn(shape[-1])
    xd = x.double()
    ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel_err(rms_norm(x, w, 1e-6), ref) < 1e-6


def test_layer_norm_including_zero_variance_rows():
    x, w, b = torch.randn(4, 333) * 100 + 50, torch.randn(333), torch.randn(333)
    x[1] = 3.0  # zero variance: output is the bias
    xd = x.double()
    mu = xd.mean(-1, keepdim=True)
    ref = (xd - mu) / torch.sqrt(((xd - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * w.double() + b.double()
    out = layer_norm(x, w, b, 1e-5)
    assert rel_err(out, ref) < 1e-6
    assert torch.allclose(out[1], b, atol=1e-5)


def test_activations():
    g, u = torch.randn(1000) * 4, torch.randn(1000) * 4
    gd, ud = g.double(), u.double()
    assert rel_err(swiglu(g, u), gd / (1 + torch.exp(-gd)) * ud) < 1e-6
    exact = 0.5 * gd * (1 + torch.erf(gd / math.sqrt(2)))
    tanh = 0.5 * gd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gd + 0.044715 * gd**3)))
    assert rel_err(gelu(g, approximate=False), exact) < 1e-6
    assert rel_err(gelu(g, approximate=True), tanh) < 1e-6
    assert rel_err(geglu(g, u), tanh * ud) < 1e-6
    gc, uc = gd.clamp(max=7), ud.clamp(-7, 7)
    assert rel_err(clamped_swiglu(g, u), (uc + 1) * gc / (1 + torch.exp(-1.702 * gc))) < 1e-6


def _rope_reference(x: torch.Tensor, pos: torch.Tensor, base: float, n_rot: int, neox: bool) -> torch.Tensor:
    """Per-element loops over the definition, float64."""
    out = x.double().clone()
    T, H, D = x.shape
    for t in range(T):
        for i in range(n_rot // 2):
            theta = float(pos[t]) * base ** (-2 * i / n_rot)
            c, s = math.cos(theta), math.sin(theta)
            a, b = (i, i + n_rot // 2) if neox else (2 * i, 2 * i + 1)
            xa, xb = x[t, :, a].double(), x[t, :, b].double()
            out[t, :, a], out[t, :, b] = xa * c - xb * s, xa * s + xb * c
    return out


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [16, 8])
def test_rope(neox, n_rot):
    x, pos = torch.randn(5, 3, 16), torch.tensor([0, 1, 7, 100, 4000])
    cfg = RopeConfig(n_rot=n_rot, base=10000.0, neox=neox)
    cos, sin = cos_sin(cfg, pos, inv_freq(cfg))
    out = apply_rope(x, cos, sin, n_rot, neox)
    assert rel_err(out, _rope_reference(x, pos, 10000.0, n_rot, neox)) < 1e-5
    assert torch.equal(out[..., n_rot:], x[..., n_rot:])


def _attention_reference(q, k, v, q_pos, window, scale, sinks=None, softcap=None):
    T, H, _ = q.shape
    Hkv, L, _ = k.shape
    out = torch.zeros(T, H, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            kh = h // (H // Hkv)
            s = [float(q[t, h].double() @ k[kh, j].double()) * scale for j in range(L)]
            if softcap is not None:
                s = [softcap * math.tanh(a / softcap) for a in s]
            ok = [j <= q_pos[t] and (window is None or q_pos[t] - j < window) for j in range(L)]
            logits = [s[j] for j in range(L) if ok[j]] + ([float(sinks[h])] if sinks is not None else [])
            m = max(logits)
            z = sum(math.exp(a - m) for a in logits)
            for j in range(L):
                if ok[j]:
                    out[t, h] += math.exp(s[j] - m) / z * v[kh, j].double()
    return out


@pytest.mark.parametrize("window,sinks", [(None, False), (3, False), (None, True), (4, True)])
# prefill, a decode row, L not a multiple of 16, rows over several key blocks (CPU: blocked_attention)
@pytest.mark.parametrize("T,L", [(4, 9), (1, 9), (7, 37), (20, 300)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_attention_gqa_against_loops(window, sinks, T, L, device):
    H, Hkv, D = 6, 2, 8
    q, k, v = torch.randn(T, H, D), torch.randn(Hkv, L, D), torch.randn(Hkv, L, D)
    q_pos = torch.arange(L - T, L)
    sink = torch.randn(H) * 3 if sinks else None  # some sinks outweigh every key
    mask = attention_mask(q_pos, torch.arange(L), window)
    out = torch.full((T, H, D), float("nan"))
    to = (lambda t: t.to(device) if t is not None else None)  # noqa: E731
    out[:] = attention(to(q), to(k), to(v), to(mask), 0.3, sinks=to(sink)).cpu()
    assert rel_err(out, _attention_reference(q, k, v, q_pos, window, 0.3, sink)) < 1e-5


@pytest.mark.parametrize("H,Hkv,hd,window,sinks,softcap", [
    (9, 3, 64, None, False, None),  # SmolLM2's heads
    (4, 1, 256, 200, False, None),  # Gemma 3's, with a window
    (8, 2, 32, 150, True, None),
    (6, 6, 16, None, False, 30.0),
])
def test_cpu_prompt_rows_do_not_depend_on_chunks_or_keys_read(H, Hkv, hd, window, sinks, softcap):
    """What prefix caching and echo logprobs rest on: a prompt row's attention on CPU is the same bits whether the
    prompt is computed whole, in chunks ending anywhere, or reading keys masked past the chunk's end."""
    g = torch.Generator().manual_seed(H * hd)
    n = 700
    q = torch.randn(n, H, hd, generator=g)
    k, v = torch.randn(Hkv, n + 100, hd, generator=g), torch.randn(Hkv, n + 100, hd, generator=g)
    sink = torch.randn(H, generator=g) * 3 if sinks else None

    def rows(start: int, end: int, keys: int) -> torch.Tensor:
        mask = attention_mask(torch.arange(start, end), torch.arange(keys), window)
        return attention(q[start:end], k[:, :keys], v[:, :keys], mask, hd**-0.5, sinks=sink, softcap=softcap)

    whole = rows(0, n, n)
    last = _attention_reference(q[-20:], k[:, :n], v[:, :n], torch.arange(n - 20, n), window, hd**-0.5, sink, softcap)
    assert rel_err(whole[-20:], last) < 1e-5
    cuts = [0, 2, 16, 18, 130, 250, 256, 383, 512, 640, 642, 690, n]  # every chunk has two rows or more
    for start, end in zip(cuts, cuts[1:]):
        assert torch.equal(rows(start, end, end), whole[start:end]), (start, end)
        assert torch.equal(rows(start, end, end + 77), whole[start:end]), (start, end)


def test_absolute_position_embedding():
    tok, table = torch.randn(5, 33) * 1e3, torch.randn(64, 33)
    pos = torch.tensor([0, 1, 63, 7, 7])
    out = absolute_position_embedding(tok, table, pos)
    ref = torch.stack([tok[i].double() + table[int(p)].double() for i, p in enumerate(pos)])
    assert rel_err(out, ref) < 1e-7
    with pytest.raises(ValueError, match="past the 64 learned positions"):
        absolute_position_embedding(tok[:1], table, torch.tensor([64]))


@pytest.mark.parametrize("neox,n_rot,hd", [(True, 64, 64), (False, 32, 48), (True, 16, 24)])
def test_triton_rope_matches_torch(neox, n_rot, hd):
    from worker_orcd.kernels.rope import RopeConfig, apply_rope, cos_sin, inv_freq
    from worker_orcd.kernels.triton_rope import apply_rope_cuda

    cfg = RopeConfig(n_rot=n_rot, base=10000.0, neox=neox)
    pos = torch.tensor([0, 5, 17])
    cos, sin = cos_sin(cfg, pos, inv_freq(cfg))
    x = torch.randn(3, 5, hd)[:, :4]  # strided heads, as q out of a fused q|k|v matrix
    want = apply_rope(x, cos, sin, n_rot, neox)
    assert torch.allclose(apply_rope_cuda(x, cos, sin, n_rot, neox), want, atol=1e-6)


@pytest.mark.parametrize("neox,n_rot,hd,dtype", [(True, 64, 64, torch.float32), (False, 32, 48, torch.float32),
                                                 (True, 16, 24, torch.bfloat16)])
def test_rope_qkv_store_is_rope_then_the_kv_store(neox, n_rot, hd, dtype):
    """One launch: q rotated out, k rotated and v as it is into the KV pools at each row's block and offset,
    bit for bit what the rope kernel followed by KVCache.write_rows gives; other pool rows untouched."""
    from worker_orcd.engine.kv_cache import KVCache
    from worker_orcd.kernels.rope import RopeConfig, apply_rope, cos_sin, inv_freq
    from worker_orcd.kernels.triton_rope import apply_rope_cuda, rope_qkv_store

    H, Hkv, T = 4, 2, 3
    cfg = RopeConfig(n_rot=n_rot, base=10000.0, neox=neox)
    pos = torch.tensor([0, 5, 17])
    cos, sin = cos_sin(cfg, pos, inv_freq(cfg))
    qkv = torch.randn(T, H + 2 * Hkv, hd).to(dtype)
    blocks, offsets = torch.tensor([3, 0, 3]), torch.tensor([1, 15, 2])
    want, got = (KVCache(1, Hkv, hd, 64, 4, dtype, block_size=16) for _ in range(2))
    for pools in (want, got):
        pools.k[0].fill_(7.0)
        pools.v[0].fill_(-7.0)
    qk = apply_rope_cuda(qkv[:, : H + Hkv], cos, sin, n_rot, neox)  # what the CUDA path ran before
    assert torch.allclose(qk.float(), apply_rope(qkv[:, : H + Hkv].float(), cos, sin, n_rot, neox), atol=3e-2)
    want.write_rows(0, blocks, offsets, qk[:, H:], qkv[:, H + Hkv :])
    q = rope_qkv_store(qkv, cos, sin, n_rot, neox, H, got.k[0], got.v[0], blocks, offsets)
    assert torch.equal(q, qk[:, :H].to(dtype))
    assert torch.equal(got.k[0], want.k[0]) and torch.equal(got.v[0], want.v[0])


@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, True), (torch.float32, False)])
def test_rope_qkv_store_sums_split_k_partials_as_the_sum_kernel_does(dtype, bias):
    """A q|k|v matmul's split-K Partials go into rope_qkv_store as they are: the same bits (q, and k and v in the
    pools) as summing them with their own kernel (Partials.dense) first; rotate_qkv takes them either way."""
    from worker_orcd.engine.kv_cache import KVCache
    from worker_orcd.kernels.rope import RopeConfig, cos_sin, inv_freq, rotate_qkv
    from worker_orcd.kernels.triton_quant import Partials
    from worker_orcd.kernels.triton_rope import rope_qkv_store

    H, Hkv, hd, T, R = 4, 2, 16, 3, 3
    N = (H + 2 * Hkv) * hd
    cfg = RopeConfig(n_rot=hd, base=10000.0, neox=True)
    cos, sin = cos_sin(cfg, torch.tensor([0, 5, 17]), inv_freq(cfg))
    part = torch.randn(R, T, N) * 3
    b = torch.randn(N) if bias else None
    p = Partials(part, T, N, R, N, T * N, b, dtype)
    blocks, offsets = torch.tensor([3, 0, 3]), torch.tensor([1, 15, 2])
    want, got = (KVCache(1, Hkv, hd, 64, 4, dtype, block_size=16) for _ in range(2))
    q_want = rope_qkv_store(p.dense().reshape(T, -1, hd), cos, sin, hd, True, H, want.k[0], want.v[0], blocks,
                            offsets)  # fmt: skip
    q_got = rope_qkv_store(p, cos, sin, hd, True, H, got.k[0], got.v[0], blocks, offsets)
    assert q_got.dtype == dtype and torch.equal(q_got, q_want)
    assert torch.equal(got.k[0], want.k[0]) and torch.equal(got.v[0], want.v[0])
    with pytest.raises(ValueError, match=r"q\|k\|v \[3, 7, 16\] with 4 q heads"):  # heads that do not fit
        rope_qkv_store(p.dense().reshape(T, -1, hd)[:, 1:], cos, sin, hd, True, H, got.k[0], got.v[0], blocks, offsets)
    q, k, v = rotate_qkv(p, cos, sin, hd, True, H, head_dim=hd)  # no paged plan: summed, then rotated in torch
    assert k is not None and torch.equal(v, p.dense().reshape(T, -1, hd)[:, H + Hkv:])


def test_triton_rms_norm_and_fused_add():
    from worker_orcd.kernels.norm import rms_norm
    from worker_orcd.kernels.triton_norm import add_rms_norm_cuda, rms_norm_cuda

    x, y, w = torch.randn(3, 96), torch.randn(3, 96), torch.randn(96)
    assert torch.allclose(rms_norm_cuda(x, w, 1e-5, torch.float32), rms_norm(x, w, 1e-5), atol=1e-5)
    res, out = add_rms_norm_cuda(x, y, w, 1e-5, torch.float32)
    assert torch.equal(res, x + y) and torch.allclose(out, rms_norm(x + y, w, 1e-5), atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_add_sums_a_matmuls_split_k_partials(bias):
    """A Q8_0 matmul's split-K Partials, summed inside add_rms_norm, give the bits of the summed matmul added
    after it; Partials.dense() gives the summed matmul."""
    from gguf import GGMLQuantizationType as T

    from tests.test_triton_quant import random_blocks
    from worker_orcd.kernels.triton_norm import add_rms_norm_cuda
    from worker_orcd.kernels.triton_quant import Partials, pack_q8_0, quant_matmul

    p = pack_q8_0(random_blocks(T.Q8_0, 40, 256), 40, 256)
    h, x, w = torch.randn(3, 256), torch.randn(3, 40), torch.randn(40)
    b = torch.randn(40) if bias else None
    cfg = {"BM": 16, "BN": 16, "NB": 1, "TARGET": 16, "num_warps": 1, "num_stages": 1}  # 3 row tiles, 6 splits
    parts = quant_matmul(p, h, cfg, out_dtype=torch.float32, bias=b, partials=True)
    assert isinstance(parts, Partials) and parts.R > 1
    y = quant_matmul(p, h, cfg, out_dtype=torch.float32, bias=b)
    assert torch.equal(parts.dense(), y)
    fused, want = add_rms_norm_cuda(x, parts, w, 1e-5, torch.float32), add_rms_norm_cuda(x, y, w, 1e-5, torch.float32)
    assert torch.equal(fused[0], want[0]) and torch.equal(fused[1], want[1])
