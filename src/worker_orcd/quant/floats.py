"""Unquantized formats; one element per block, read by reinterpreting bytes.

F32:  4 bytes, IEEE binary32, little-endian.
F16:  2 bytes, IEEE binary16, little-endian.
BF16: 2 bytes, the high half of a binary32 (sign, 8-bit exponent, 7-bit mantissa).
"""

from __future__ import annotations

import torch


def dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes -> [n, 1]."""
    return blocks.contiguous().view(torch.float32).clone()


def dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> [n, 1]."""
    h = blocks.contiguous().view(torch.int16)
    x = h.view(torch.float16).to(torch.float32)
    # hardware conversion quiets signaling NaNs; ggml and numpy keep the payload bits as they are
    h = h.to(torch.int32)
    nan_bits = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x03FF) << 13)
    return torch.where(torch.isnan(x), nan_bits.view(torch.float32), x)


def dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> [n, 1]."""
    # shift the bits into the high half, as ggml does, so NaN payloads pass through unchanged
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
