"""The MXFP4 quantizer: bit-exact against gguf.quants, and a round trip within the format's resolution."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from worker_orcd.quant import dequantize
from worker_orcd.quant.mxfp4 import quantize_mxfp4


@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.0, 300.0])
def test_quantize_bit_exact_against_gguf(scale):
    rng = np.random.default_rng(int(scale * 1000))
    x = (rng.standard_normal((64, 256)) * scale).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = 2.0 ** rng.integers(-8, 8, 32)  # exact powers of two
    x[2, 0] = 6.0 * 2.0**3  # the largest representable value of its block
    ours = quantize_mxfp4(torch.from_numpy(x)).numpy()
    ref = quants.quantize(x, T.MXFP4)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)


def test_round_trip_error_is_bounded_by_the_block_scale():
    x = torch.randn(8, 128) * 0.1
    back = dequantize(quantize_mxfp4(x).reshape(8, -1), T.MXFP4, (8, 128))
    amax = x.reshape(-1, 32).abs().amax(-1, keepdim=True)
    s = 2.0 ** (torch.floor(torch.log2(amax)) - 2)  # one E2M1 unit at the block's scale; values are k*s, k <= 6
    err = (back - x).reshape(-1, 32).abs()
    # inside the range: half the widest gap (4 -> 6) is s; values in (6s, 8s) saturate to 6s: under 2s
    bound = torch.where(x.reshape(-1, 32).abs() <= 6 * s, s, 2 * s)
    assert (err <= bound).all()


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(3, 40))
