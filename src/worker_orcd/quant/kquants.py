"""The 256-element "k-quant" super-block formats. d and dmin are little-endian f16.

Q4_K (144 B): d, dmin, scales[12], qs[128]
    8 sub-blocks of 32, each with a 6-bit scale sc and min m packed in `scales` (see `_scale_min`);
    qs holds 4 chunks of 32 bytes: chunk c's low nibbles are sub-block 2c, its high nibbles 2c+1.
    x = (d * sc) * q - (dmin * m)
Q5_K (176 B): d, dmin, scales[12], qh[32], qs[128]
    as Q4_K, plus bit s of qh[i] is the fifth bit of element i of sub-block s.
Q6_K (210 B): ql[128], qh[64], scales[16] (int8), d
    16 sub-blocks of 16 with scale d * scales[s]; q = (4 low bits | 2 high bits << 4) - 32.
    Each half of 128 elements reads 64 bytes of ql (low nibbles: elements 0..63, high: 64..127)
    and 32 bytes of qh (bit pairs 0, 2, 4, 6: elements 0..31, 32..63, 64..95, 96..127).
"""

from __future__ import annotations

import torch

from worker_orcd.quant._bytes import bits, f16, nibbles


def _scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 12] packed bytes -> 6-bit scales [n, 8] and mins [n, 8] (ggml's get_scale_min_k4).

    Bytes 0-3: scales 0-3 in the low 6 bits, top 2 bits of scales 4-7; bytes 4-7: the same for the mins;
    bytes 8-11: low 4 bits of scales 4-7 in the low nibble, of mins 4-7 in the high nibble.
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _sub_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K header -> per-sub-block scale and offset, float32 [n, 8, 1]."""
    sc, mn = _scale_min(blocks[:, 4:16])
    scale = f16(blocks[:, 0:2]) * sc.to(torch.float32)
    offset = f16(blocks[:, 2:4]) * mn.to(torch.float32)
    return scale.unsqueeze(-1), offset.unsqueeze(-1)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 144] bytes -> [n, 256]."""
    n = blocks.shape[0]
    scale, offset = _sub_scales(blocks)
    q = nibbles(blocks[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32)
    return (scale * q.to(torch.float32) - offset).reshape(n, 256)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 176] bytes -> [n, 256]."""
    n = blocks.shape[0]
    scale, offset = _sub_scales(blocks)
    low = nibbles(blocks[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = bits(blocks[:, 16:48])  # [n, 8, 32]
    return (scale * (low | (high << 4)).to(torch.float32) - offset).reshape(n, 256)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 210] bytes -> [n, 256]."""
    n = blocks.shape[0]
    low = nibbles(blocks[:, 0:128].reshape(n, 2, 64)).reshape(n, 8, 32)
    high = bits(blocks[:, 128:192].reshape(n, 2, 32), width=2).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32) - 32
    scale = f16(blocks[:, 208:210]) * blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return (scale.unsqueeze(-1) * q.reshape(n, 16, 16)).reshape(n, 256)
