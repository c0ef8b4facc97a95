"""Triton GEMM for the nibble formats (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) and the dense F32/F16/BF16
matrices on CUDA, against float64 references built on gguf's own dequantization.

On CPU through TRITON_INTERPRET=1 at tiny shapes (conftest sets it; the interpreter dots in float32, so the
bound is 1e-5); on the GPU at real shapes (bf16 tensor-core operands: 1e-2).
"""

import functools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from worker_orcd.kernels.triton_kquant import dequantize_kquant, kquant_matmul
from worker_orcd.kernels.triton_quant import split_k
from worker_orcd.models.weights import fuse_rows
from worker_orcd.quant import QuantTensor
from worker_orcd.quant.gpu_matmul import gpu_matmul, packed
from worker_orcd.quant.packed import NIBBLE_FORMATS, cat_rows, pack_nibbles, unpack

KINDS = list(NIBBLE_FORMATS)
K_QUANTS = ["q4_k", "q5_k", "q6_k"]
SPLIT = {"BM": 16, "BN": 16, "TARGET": 8, "num_warps": 1, "num_stages": 1}  # 2 row tiles -> 2+ splits


def f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)[..., None].view(np.uint8)


@functools.cache
def gguf_blocks(kind: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, row bytes] of valid blocks: gguf's quantizer on N(0, 0.02) weights where it has one (the
    legacy formats), else random bytes with realistic f16 scales (d, dmin ~ 1e-4..1e-3; Q6_K d ~ 1e-5..1e-4)."""
    f = NIBBLE_FORMATS[kind]
    rng = np.random.default_rng(seed)
    if kind not in K_QUANTS:
        w = rng.normal(0, 0.02, (rows, k)).astype(np.float32)
        return gguf_quants.quantize(w, f.ggml_type).reshape(rows, -1)
    nb = k // 256
    raw = rng.integers(0, 256, (rows, nb, f.size), dtype=np.uint8)
    if kind == "q6_k":
        raw[..., 208:210] = f16_bytes(rng.uniform(1e-5, 1e-4, (rows, nb)))
    else:
        raw[..., 0:4] = f16_bytes(rng.uniform(1e-4, 1e-3, (rows, nb, 2))).reshape(rows, nb, 4)
    return raw.reshape(rows, -1)


@functools.cache
def reference_weight(kind: str, rows: int, k: int) -> torch.Tensor:
    """gguf's reference dequantization of gguf_blocks(kind, rows, k), float64 [rows, K]."""
    raw = gguf_blocks(kind, rows, k)
    return torch.from_numpy(gguf_quants.dequantize(raw, NIBBLE_FORMATS[kind].ggml_type).astype(np.float64))


def blocks(kind: str, rows: int, k: int, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(gguf_blocks(kind, rows, k).copy()).to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "output has NaN/inf (unwritten or overflowed)"
    return float((a.double() - b.double()).norm() / b.double().norm())


def check(kind: str, n: int, k: int, m: int, dtype: torch.dtype, tol: float, device: str = "cpu", cfg=None):
    x = torch.randn(m, k, device=device).to(dtype)
    ref = x.double() @ reference_weight(kind, n, k).to(device).T
    y = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    kquant_matmul(pack_nibbles(kind, blocks(kind, n, k, device), n, k), x, cfg, out=y)
    assert rel_err(y, ref) < tol


def shapes(kind: str) -> list[tuple[int, int]]:
    """(n, k): ragged row tiles; K one super-block and two (k-quants), K a part step and two steps (legacy)."""
    return [(20, 256), (7, 512)] if kind in K_QUANTS else [(20, 96), (7, 512)]


@pytest.mark.parametrize("kind", KINDS)
def test_pack_keeps_the_bits_and_unpacks_exactly(kind):
    """Same bytes as the blocks, no expansion; the blocks come back bit for bit, whole, by rows and gathered."""
    f = NIBBLE_FORMATS[kind]
    raw = torch.randint(0, 256, (9, 512 // f.block * f.size), dtype=torch.uint8)  # any bytes (NaN scales too)
    p = pack_nibbles(kind, raw, 9, 512)
    assert p.nbytes == raw.numel()
    assert torch.equal(unpack(p), raw)
    assert torch.equal(unpack(p.rows(2, 5)), raw[2:5])
    ids = torch.tensor([8, 0, 8])
    assert torch.equal(unpack(p.take(ids)), raw[ids])
    assert torch.equal(unpack(cat_rows([p.rows(0, 4), p.rows(4, 9)])), raw)
    assert torch.equal(unpack(pack_nibbles(kind, raw, 9, 512, chunk_rows=4)), raw)  # packed in row chunks


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_is_ggufs(kind):
    """The prefill path's weights: gguf's values exactly in float32, within a bf16 step in bf16 (the interpreter
    truncates where the GPU rounds)."""
    ref = reference_weight(kind, 11, 512).float()
    p = pack_nibbles(kind, blocks(kind, 11, 512), 11, 512)
    assert torch.equal(dequantize_kquant(p, torch.float32), ref)
    assert torch.allclose(dequantize_kquant(p, torch.bfloat16).float(), ref, rtol=2**-7, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 19])
def test_gemm_interpreted(kind, m):
    for n, k in shapes(kind):
        check(kind, n, k, m, torch.float32, 1e-5)
    check(kind, 20, 512, m, torch.bfloat16, 1e-2)  # bf16 in and out


@pytest.mark.parametrize("kind", ["q4_0", "q5_1", "q4_k", "q6_k"])
def test_gemm_split_k(kind):
    assert split_k(1024 // 8, 2, 32, 8)[0] == 2
    check(kind, 20, 1024, 3, torch.float32, 1e-5, cfg=SPLIT)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [None, SPLIT], ids=["one-split", "split-k"])
def test_decode_rows_do_not_depend_on_the_batch(kind, cfg):
    """Tiles and split-K follow the weight's shape, never the row count: a row alone, among 16 and among 64
    gives the same bits."""
    p = pack_nibbles(kind, blocks(kind, 20, 1024), 20, 1024)
    x = torch.randn(64, 1024)
    many = kquant_matmul(p, x, cfg)
    sixteen = kquant_matmul(p, x[:16], cfg)
    for r in (0, 5, 15):
        alone = kquant_matmul(p, x[r : r + 1], cfg)[0]
        assert torch.equal(alone, many[r]) and torch.equal(alone, sixteen[r])
    assert torch.equal(kquant_matmul(p, x[40:41], cfg)[0], many[40])


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_matmul_takes_the_kernel_and_keeps_the_blocks(kind, monkeypatch):
    n, k = shapes(kind)[0]
    raw = blocks(kind, n, k)
    w = QuantTensor(raw.clone(), NIBBLE_FORMATS[kind].ggml_type, (n, k))
    ref = reference_weight(kind, n, k)
    monkeypatch.setattr(QuantTensor, "dequantize", lambda *a, **kw: pytest.fail("dequantized per call"))
    x = torch.randn(2, 3, k)
    y = gpu_matmul(w, x)
    assert y.shape == (2, 3, n) and packed(w).kind == kind and packed(w) is packed(w)
    assert rel_err(y, x.double() @ ref.T) < 1e-5
    assert gpu_matmul(w, x[0], out_dtype=torch.bfloat16).dtype == torch.bfloat16
    monkeypatch.undo()
    # packed-only, as models/weights.py holds them on CUDA: rows, embedding and fused matrices still exact
    a = QuantTensor(raw.clone(), w.ggml_type, (n, k)).pack_resident()
    b = QuantTensor(raw.clone(), w.ggml_type, (n, k)).pack_resident()
    assert a._raw is None and torch.equal(a.raw, raw)
    assert torch.equal(a.embedding(torch.tensor([3, 0])), ref[[3, 0]].float())
    fused = fuse_rows(a, b)
    assert fused.packed.kind == kind and torch.equal(fused.raw, torch.cat([raw, raw]))


@pytest.mark.parametrize("ggml_type,dtype", [(T.F32, torch.float32), (T.F16, torch.float16), (T.BF16, torch.bfloat16)])
def test_float_matrices_are_held_once_in_their_dtype(ggml_type, dtype, monkeypatch):
    """F32/F16/BF16 matrices: the values in their own dtype at pack time, torch.matmul per call, no conversion."""
    values = (torch.randn(10, 64) * 0.1).to(dtype)
    w = QuantTensor(values.view(torch.uint8).reshape(10, -1).clone(), ggml_type, (10, 64)).pack_resident()
    assert w.packed.codes.dtype == dtype and torch.equal(w.packed.codes, values) and w.packed.nbytes == w.nbytes
    assert torch.equal(w.raw, values.view(torch.uint8).reshape(10, -1))
    monkeypatch.setattr(QuantTensor, "dequantize", lambda *a, **kw: pytest.fail("dequantized per call"))
    x = torch.randn(3, 64).bfloat16()
    y = gpu_matmul(w, x, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert rel_err(y, x.double() @ values.double().T) < 1e-2


# real shapes: the dense matrices of a 20B model (q, o, ffn) and a head-sized one
GPU_SHAPES = [(4096, 2880), (2880, 4096), (2880, 2880)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 128, 300])
def test_gpu_real_shapes(kind, n, k, m):
    if kind in K_QUANTS and k % 256:
        k = k // 256 * 256 + 256
    check(kind, n, k, m, torch.float32, 1e-2, device="cuda")  # bf16 tensor-core operands
    check(kind, n, k, m, torch.bfloat16, 1e-2, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_decode_rows_do_not_depend_on_the_batch(kind):
    """The default decode path on the device: a row alone gives the bits it gives among 16 and among 64."""
    n, k = 2880, 4096
    p = pack_nibbles(kind, blocks(kind, n, k, "cuda"), n, k)
    x = torch.randn(64, k, device="cuda").bfloat16()
    many, sixteen = kquant_matmul(p, x), kquant_matmul(p, x[:16])
    for r in (0, 7, 15):
        alone = kquant_matmul(p, x[r : r + 1])[0]
        assert torch.equal(alone, many[r]) and torch.equal(alone, sixteen[r])
    assert torch.equal(kquant_matmul(p, x[63:64])[0], many[63])


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type,dtype,n,k", [(T.F32, torch.float32, 32, 2880), (T.BF16, torch.bfloat16, 2880, 4096),
                                                 (T.F16, torch.float16, 2880, 4096)])
def test_gpu_float_matrices(ggml_type, dtype, n, k):
    """Dense matrices, decode rows through kernels/triton_float.py: right, and a row alone gets the bits it gets
    among 64 (cuBLAS alone does not: measured on an H200)."""
    values = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    w = QuantTensor(values.view(torch.uint8).reshape(n, -1), ggml_type, (n, k)).pack_resident()
    x = torch.randn(64, k, device="cuda").bfloat16()
    many = gpu_matmul(w, x)
    assert rel_err(many, x.double() @ values.double().T) < 1e-2
    for r in (0, 37):
        assert torch.equal(gpu_matmul(w, x[r : r + 1])[0], many[r])
