"""quant/ on the two packaged models: every tensor, whole, bit-exact against gguf.quants.dequantize."""

import numpy as np
import pytest
import torch
from gguf import quants as ref_quants

from worker_orcd.gguf import open_gguf
from worker_orcd.quant import SUPPORTED_TYPES, QuantTensor, dequantize


@pytest.fixture(params=["smollm2_path", "gemma3_path"])
def model(request):
    with open_gguf(request.getfixturevalue(request.param)) as f:
        yield f


def test_every_tensor_bit_exact(model):
    """All tensors, embeddings included (Gemma's 262144 x 640 Q8_0 dominates: ~10 s on two slow cores)."""
    for name, ref in model.tensors.items():
        assert ref.ggml_type in SUPPORTED_TYPES, name
        raw = model.tensor_bytes(name)
        got = dequantize(torch.from_numpy(raw.copy()), ref.ggml_type, ref.shape)
        want = ref_quants.dequantize(raw, ref.ggml_type).reshape(ref.shape)
        assert got.shape == ref.shape, name
        assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32)), name


def test_embedding_and_matmul_on_real_weights(model):
    ref = model.tensors["token_embd.weight"]
    emb = QuantTensor.from_bytes(model.tensor_bytes(ref.name), ref.ggml_type, ref.shape)
    ids = torch.tensor([0, 1, ref.shape[0] // 2, ref.shape[0] - 1])
    rows = emb.raw[ids].numpy()
    want = torch.from_numpy(ref_quants.dequantize(rows, ref.ggml_type))
    assert torch.equal(emb.embedding(ids), want)
    # the first layer's gate projection, through the matmul registered for CPU
    gate = model.tensors["blk.0.ffn_gate.weight"]
    w = QuantTensor.from_bytes(model.tensor_bytes(gate.name), gate.ggml_type, gate.shape)
    x = torch.randn(3, gate.shape[1], generator=torch.Generator().manual_seed(0))
    y = w.matmul(x)
    exact = x.double() @ w.dequantize(torch.float64).T
    assert float((y.double() - exact).norm() / exact.norm()) < 1e-2
