"""The CPU weight-only packed matmuls against float64 on the exact dequantized weights."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from worker_orcd.quant.cpu_matmul import pack_for_cpu
from worker_orcd.quant.cpu_q8dot import Q8DotLinear


def _random_q4_k(rng, n, k):
    raw = rng.integers(0, 256, (n, k // 256 * 144), dtype=np.uint8)
    blocks = raw.reshape(n, k // 256, 144)
    blocks[..., 0:2] = np.frombuffer(np.float16(rng.uniform(0.005, 0.02)).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(rng.uniform(0.005, 0.02)).tobytes(), np.uint8)
    return raw


@pytest.mark.parametrize("gtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q4_K])
def test_packed_matmul_matches_float64(gtype):
    rng = np.random.default_rng(int(gtype))
    n, k = 80, 512
    if gtype == T.Q4_K:
        raw = _random_q4_k(rng, n, k)
    else:
        raw = quants.quantize(rng.standard_normal((n, k)).astype(np.float32), gtype)
    w = torch.from_numpy(quants.dequantize(raw, gtype).reshape(n, k)).double()
    lin = pack_for_cpu(torch.from_numpy(np.ascontiguousarray(raw)).reshape(n, -1), gtype, (n, k))
    assert lin is not None
    x = torch.randn(3, k)
    y = torch.full((3, n), float("nan"))
    y[:] = lin(x)
    ref = x.double() @ w.T
    # bf16 activations, scales and outputs: ~2^-9 relative per element; llama.cpp's 8-bit activations: ~2x that
    tol = 1.2e-2 if isinstance(lin, Q8DotLinear) else 6e-3
    assert float((y.double() - ref).norm() / ref.norm()) < tol
    assert y.dtype == torch.float32 and y.shape == (3, n)


def test_unsupported_types_fall_back():
    assert pack_for_cpu(torch.zeros(4, 8, dtype=torch.uint8), T.F16, (4, 4)) is None


@pytest.mark.parametrize("gtype", [T.Q4_1, T.Q8_0, T.Q6_K, T.F16])
@pytest.mark.parametrize("k", [512, 2048])  # oneDNN's bf16 one-row kernel differs from its batched one at large K
def test_decode_rows_do_not_depend_on_the_batch(gtype, k):
    from worker_orcd.quant import QuantTensor

    rng = np.random.default_rng(7)
    n = 64
    if gtype == T.Q6_K:
        raw = rng.integers(0, 256, (n, k // 256 * 210), dtype=np.uint8)
        raw.reshape(n, k // 256, 210)[..., 208:210] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    else:
        raw = quants.quantize(rng.standard_normal((n, k)).astype(np.float32), gtype)
    w = QuantTensor.from_bytes(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), gtype, (n, k))
    x = torch.randn(16, k)
    batched = w.matmul(x)
    alone = torch.cat([w.matmul(x[i : i + 1]) for i in range(16)])
    assert torch.equal(batched, alone)
    assert torch.equal(w.matmul(x[3:11]), batched[3:11])
