"""kernels/triton_float.py: decode rows of float matrices against a float64 reference (Triton interpreter on
CPU), split over K, with a bias; the batch-invariance check on the device is in test_triton_kquant.py."""

import pytest
import torch

from worker_orcd.kernels.triton_float import float_matmul
from worker_orcd.quant.packed import FLOAT_DTYPES, PackedWeight


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", sorted(FLOAT_DTYPES))
@pytest.mark.parametrize("m", [1, 19])
def test_float_matmul_matches_float64(kind, m):
    n, k = 40, 200  # K not a multiple of the 32-column step: the tail is masked
    values = (torch.randn(n, k) * 0.1).to(FLOAT_DTYPES[kind])
    w = PackedWeight(kind, values, values.new_empty(n, 0), n, k)
    x, b = torch.randn(m, k), torch.randn(n)
    ref = x.double() @ values.double().T
    one = {"BM": 16, "BN": 16, "BK": 32, "TARGET": 1, "num_warps": 1, "num_stages": 1}
    split = one | {"TARGET": 32}  # 3 column tiles -> 7 splits of K
    for cfg in (one, split):
        assert rel_err(float_matmul(w, x, cfg), ref) < 1e-6
        assert rel_err(float_matmul(w, x, cfg, bias=b), ref + b.double()) < 1e-6
    # bf16 activations, as the engine sends them: x's own rounding is the only error
    xb = x.bfloat16()
    assert rel_err(float_matmul(w, xb, out_dtype=torch.float32), xb.double() @ values.double().T) < 1e-5


def test_float_matmul_refuses_quantized_weights():
    w = PackedWeight("q8_0", torch.zeros(4, 8, dtype=torch.int32), torch.zeros(4, 1), 4, 32)
    with pytest.raises(ValueError, match="not a float matrix"):
        float_matmul(w, torch.randn(1, 32))
