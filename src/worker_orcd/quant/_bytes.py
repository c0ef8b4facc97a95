"""Byte-field helpers shared by the block formats: little-endian floats and packed bits from uint8 tensors."""

from __future__ import annotations

import torch


def f16(field: torch.Tensor) -> torch.Tensor:
    """Little-endian f16 from byte pairs [..., 2] -> float32 [..., 1]."""
    return field.contiguous().view(torch.float16).to(torch.float32)


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n]: low nibbles, then high nibbles."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def bits(qh: torch.Tensor, width: int = 1) -> torch.Tensor:
    """[..., n] bytes -> [..., 8 // width, n]: field k of every byte is bits [k*width, (k+1)*width)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=qh.device)
    return (qh.unsqueeze(-2) >> shifts.unsqueeze(-1)) & ((1 << width) - 1)
