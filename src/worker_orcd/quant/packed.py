"""Weights repacked for the GPU kernels (kernels/triton_quant.py, triton_moe.py), and back: torch only.

Weights are repacked once from ggml blocks into 32-bit words plus a separate scale per 32-weight block,
never expanded. Within a block the codes are permuted so that each way the kernel pulls values out of
a word lines up with a contiguous run of x (one vector load per run, reused over the rows of a tile):

Q8_0: codes uint32 [N, K/4], scales f16 [N, K/32]. Word i (0..7) of a block holds elements i, 8+i, 16+i,
      24+i in bytes 0..3. Byte -> float by bit-building: float(0x4B000000 | (b ^ 0x80)) - (2^23 + 128).
MXFP4: codes uint32 [N, K/8], exponents uint8 [N, K/32]. Word i (0..3) of a block has 4 slots s in each
      16-bit half h, holding element 8s + 4h + i: its 3 magnitude bits at MAG_BIT[s] and its sign at
      SIGN_BIT[s]. One shift and mask (slots 0, 1; two shifts for 2, 3) puts a slot's two codes into the
      sign, exponent-low and top-mantissa bits of an f16 pair: f16 value = E2M1 value * 2^-14 (subnormals
      give 0 and 0.5 exactly), and w = f16 * 2^14 * 2^(e-127), ggml's doubled table times 2^(e-128).
      Two exponent bytes differ from ggml: 0 scales by 0 (ggml: 2^-127) and 255 by 2^127 (ggml: 2^128);
      real weights use neither (OCP MX reserves 255 for NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as T

from worker_orcd.quant._bytes import f16

# MXFP4 slot s: magnitude bits at MAG_BIT[s]..+2 and sign at SIGN_BIT[s] of each 16-bit half
MXFP4_MAG_BIT = (0, 3, 10, 13)
MXFP4_SIGN_BIT = (6, 9, 7, 8)


@dataclass(frozen=True)
class PackedWeight:
    """A repacked 2-D (or stacked [E, N, K]) weight: codes uint32 [rows, words], scales [rows, K/32]."""

    kind: str  # "q8_0" | "mxfp4"
    codes: torch.Tensor
    scales: torch.Tensor
    n: int  # output features per matrix
    k: int  # input features

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * 4 + self.scales.numel() * self.scales.element_size()

    def rows(self, start: int, stop: int, n: int | None = None) -> PackedWeight:
        """Rows [start, stop) as a weight of `n` output features (a view: one expert of a stacked weight)."""
        return PackedWeight(self.kind, self.codes[start:stop], self.scales[start:stop], n or stop - start, self.k)

    def take(self, ids: torch.Tensor) -> PackedWeight:
        """The rows `ids` (a gather: embedding lookups)."""
        return PackedWeight(self.kind, self.codes[ids], self.scales[ids], ids.numel(), self.k)


def _words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, K] byte codes (already permuted) -> int32 [rows, K/4] little-endian words."""
    return codes.contiguous().view(torch.int32)


def pack_q8_0(raw: torch.Tensor, n: int, k: int) -> PackedWeight:
    """Q8_0 blocks uint8 [rows, K/32*34] (rows = any multiple of n) -> PackedWeight on raw's device."""
    rows = raw.shape[0]
    b = raw.reshape(rows, k // 32, 34)
    d = f16(b[..., 0:2]).squeeze(-1).to(torch.float16)  # [rows, K/32]
    q = b[..., 2:34].reshape(rows, k // 32, 4, 8)  # element 8t + i at [t, i]
    q = q.transpose(-1, -2).reshape(rows, k)  # byte 4i + t = element 8t + i
    return PackedWeight("q8_0", _words(q), d.contiguous(), n, k)


def pack_mxfp4(raw: torch.Tensor, n: int, k: int, chunk_rows: int = 16384) -> PackedWeight:
    """MXFP4 blocks uint8 [rows, K/32*17] -> PackedWeight (code bits placed as the module doc says).

    Rows go through in chunks, so the int64 temporaries stay small next to the tensor itself.
    """
    rows = raw.shape[0]
    b = raw.reshape(rows, k // 32, 17)
    words = torch.empty(rows, k // 8, dtype=torch.int32, device=raw.device)
    for r in range(0, rows, chunk_rows):
        words[r : r + chunk_rows] = _mxfp4_words(b[r : r + chunk_rows, :, 1:17]).reshape(-1, k // 8)
    return PackedWeight("mxfp4", words, b[..., 0].contiguous(), n, k)


def unpack(p: PackedWeight, chunk_rows: int = 16384) -> torch.Tensor:
    """The ggml blocks uint8 [rows, K/32*block bytes] that `p` was packed from (bit for bit)."""
    rows = p.codes.shape[0]
    nb = p.k // 32
    if p.kind == "q8_0":
        q = p.codes.contiguous().view(torch.uint8).reshape(rows, nb, 8, 4).transpose(-1, -2).reshape(rows, nb, 32)
        d = p.scales.contiguous().view(torch.uint8).reshape(rows, nb, 2)
        return torch.cat([d, q], dim=-1).reshape(rows, nb * 34)
    out = torch.empty(rows, nb, 17, dtype=torch.uint8, device=p.codes.device)
    out[..., 0] = p.scales
    for r in range(0, rows, chunk_rows):
        out[r : r + chunk_rows, :, 1:] = _mxfp4_nibbles(p.codes[r : r + chunk_rows].reshape(-1, nb, 4))
    return out.reshape(rows, nb * 17)


def _mxfp4_layout(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """elem [word i, slot s, half h] and the magnitude / sign bit positions [s, h] of the packed layout."""
    i, s, h = torch.arange(4, device=dev), torch.arange(4, device=dev), torch.arange(2, device=dev)
    elem = 8 * s[None, :, None] + 4 * h[None, None, :] + i[:, None, None]
    mag_at = torch.tensor(MXFP4_MAG_BIT, device=dev)[:, None] + 16 * h[None, :]
    sign_at = torch.tensor(MXFP4_SIGN_BIT, device=dev)[:, None] + 16 * h[None, :]
    return elem, mag_at, sign_at


def _mxfp4_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, nb, 4] words -> [rows, nb, 16] ggml nibble bytes (the inverse of _mxfp4_words)."""
    rows, nb, _ = words.shape
    elem, mag_at, sign_at = _mxfp4_layout(words.device)
    w = (words.to(torch.int64) & 0xFFFFFFFF)[..., :, None, None]  # [rows, nb, i, 1, 1]
    c = ((w >> mag_at) & 7) | (((w >> sign_at) & 1) << 3)  # [rows, nb, i, s, h]
    codes = torch.empty(rows, nb, 32, dtype=torch.int64, device=words.device)
    codes[..., elem.reshape(-1)] = c.reshape(rows, nb, -1)
    return (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)


def _mxfp4_words(qs: torch.Tensor) -> torch.Tensor:
    """qs [rows, nb, 16] (ggml nibbles) -> int32 [rows, nb, 4] words."""
    rows, nb, _ = qs.shape
    codes = torch.stack([qs & 0x0F, qs >> 4], dim=-2).reshape(rows, nb, 32).to(torch.int64)  # element order
    elem, mag_at, sign_at = _mxfp4_layout(qs.device)
    c = codes[..., elem]  # [rows, nb, word i, slot s, half h]
    words = (((c & 7) << mag_at) | ((c >> 3) << sign_at)).sum(dim=(-1, -2))  # disjoint bits: sum == or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


PACKERS = {T.Q8_0: pack_q8_0, T.MXFP4: pack_mxfp4}


def pack(raw: torch.Tensor, ggml_type: T, shape: tuple[int, ...]) -> PackedWeight | None:
    """The kernels' layout of a weight's blocks (rows = all leading dims); None for formats without a kernel."""
    packer = PACKERS.get(ggml_type)
    if packer is None or len(shape) < 2:
        return None
    return packer(raw, shape[-2], shape[-1])
