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

DOUBLED_E2M1 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@functools.lru_cache(maxsize=8)
def _table(device: torch.device) -> torch.Tensor:
    return torch.tensor(DOUBLED_E2M1, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=8)
def _byte_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2]: the (low nibble, high nibble) values of every byte, so one lookup decodes two codes."""
    b = torch.arange(256, device=device)
    return torch.stack([_table(device)[b & 15], _table(device)[b >> 4]], dim=-1)


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """uint8 exponents -> float32 2^(e-128), built from bits exactly as ggml does."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 17] bytes -> [n, 32]."""
    n = blocks.shape[0]
    pairs = torch.nn.functional.embedding(blocks[:, 1:17].to(torch.int32), _byte_pairs(blocks.device))  # [n, 16, 2]
    return e8m0_to_fp32_half(blocks[:, 0:1]) * pairs.transpose(1, 2).reshape(n, 32)


def quantize_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """float [..., K] (K a multiple of 32) -> MXFP4 blocks uint8 [..., K/32 * 17].

    OCP MX: the shared exponent is floor(log2(amax)) - 2 (E2M1's largest exponent), each element the
    nearest E2M1 value (ties to the lower code index, values past 6 saturate), as gguf-py does.
    """
    if x.shape[-1] % 32:
        raise ValueError(f"MXFP4 needs rows that are a multiple of 32, got {x.shape[-1]}")
    lead = x.shape[:-1]
    blocks = x.float().reshape(-1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2 + 127, torch.zeros_like(amax))
    e = (e.to(torch.int32) & 0xFF).to(torch.uint8)  # wraps like numpy's astype(uint8)
    d = e8m0_to_fp32_half(e)  # [n, 1]
    candidates = d[:, :, None] * _table(blocks.device)[None, None, :]  # [n, 1, 16]
    codes = torch.argmin((candidates - blocks[:, :, None]).abs(), dim=-1).to(torch.uint8)  # [n, 32]
    qs = codes[:, :16] | (codes[:, 16:] << 4)
    return torch.cat([e, qs], dim=-1).reshape(*lead, -1)
