"""The 32-element block formats (ggml's "legacy" quants). d and m are little-endian f16.

Q4_0 (18 B): d, qs[16]            x[j] = d * (q - 8);   q of element j: low nibble of qs[j], j+16: high nibble
Q4_1 (20 B): d, m, qs[16]         x[j] = d * q + m;     nibbles as Q4_0
Q5_0 (22 B): d, qh[4], qs[16]     x[j] = d * (q - 16);  q = nibble | bit j of qh (as a little-endian u32) << 4
Q5_1 (24 B): d, m, qh[4], qs[16]  x[j] = d * q + m;     q as Q5_0
Q8_0 (34 B): d, qs[32] (int8)     x[j] = d * qs[j]
"""

from __future__ import annotations

import torch

from worker_orcd.quant._bytes import bits, f16, nibbles


def _q4(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] 4-bit codes."""
    return nibbles(qs).reshape(qs.shape[0], 32)


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """qh [n, 4], qs [n, 16] -> [n, 32] 5-bit codes."""
    high = bits(qh).transpose(-1, -2).reshape(qh.shape[0], 32)  # bit j of the u32 is bit j%8 of byte j//8
    return _q4(qs) | (high << 4)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 18] bytes -> [n, 32]."""
    return f16(blocks[:, 0:2]) * (_q4(blocks[:, 2:18]).to(torch.float32) - 8)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 20] bytes -> [n, 32]."""
    return f16(blocks[:, 0:2]) * _q4(blocks[:, 4:20]).to(torch.float32) + f16(blocks[:, 2:4])


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 22] bytes -> [n, 32]."""
    return f16(blocks[:, 0:2]) * (_q5(blocks[:, 2:6], blocks[:, 6:22]).to(torch.float32) - 16)


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 24] bytes -> [n, 32]."""
    return f16(blocks[:, 0:2]) * _q5(blocks[:, 4:8], blocks[:, 8:24]).to(torch.float32) + f16(blocks[:, 2:4])


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 34] bytes -> [n, 32]."""
    return f16(blocks[:, 0:2]) * blocks[:, 2:34].contiguous().view(torch.int8).to(torch.float32)
