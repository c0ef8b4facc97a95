"""MXFP4 (OCP microscaling FP4), ggml type 39: blocks of 32 elements, 17 bytes.

Byte 0: e, an E8M0 shared exponent (scale 2^(e-127)).
Bytes 1-16: E2M1 codes (sign, 2-bit exponent, 1-bit mantissa); element j is the low nibble of byte 1+j,
element j+16 the high nibble. Magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}.
As ggml does, the code table is doubled ({0, 1, 2, 3, 4, 6, 8, 12}) and the scale halved
(ggml_e8m0_to_fp32_half), so x = table[code] * 2^(e-128); e = 0 and 1 give subnormal halves,
and e = 255 is read as 2^127, not NaN.
"""

from __future__ import annotations

import functools

import torch

from worker_orcd.quant._bytes import nibbles

DOUBLED_E2M1 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@functools.lru_cache(maxsize=8)
def _table(device: torch.device) -> torch.Tensor:
    return torch.tensor(DOUBLED_E2M1, dtype=torch.float32, device=device)


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """uint8 exponents -> float32 2^(e-128), built from bits exactly as ggml does."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 17] bytes -> [n, 32]."""
    n = blocks.shape[0]
    codes = nibbles(blocks[:, 1:17]).reshape(n, 32)
    return e8m0_to_fp32_half(blocks[:, 0:1]) * _table(blocks.device)[codes.to(torch.int64)]
