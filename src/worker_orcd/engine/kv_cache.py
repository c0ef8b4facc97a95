"""A preallocated KV cache: per layer, K and V buffers [slots, kv_heads, max_len, head_dim]."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        n_slots: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        head_dim_v: int | None = None,
    ):
        self.max_len = max_len
        self.n_slots = n_slots
        shape_k = (n_slots, n_kv_heads, max_len, head_dim)
        shape_v = (n_slots, n_kv_heads, max_len, head_dim_v or head_dim)
        self.k = [torch.zeros(shape_k, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape_v, dtype=dtype, device=device) for _ in range(n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write_rows(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim]: row t goes to slot slots[t] at position positions[t]."""
        self.k[layer][slots, :, positions] = k.to(self.k[layer].dtype)
        self.v[layer][slots, :, positions] = v.to(self.v[layer].dtype)

    def read(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [kv_heads, length, head_dim] for positions 0..length-1 of `slot` (views, no copy)."""
        return self.k[layer][slot, :, :length], self.v[layer][slot, :, :length]


class SeqSpan:
    """Rows [start, end) of a batch belong to the sequence held in KV cache `slot`."""

    __slots__ = ("slot", "start", "end")

    def __init__(self, slot: int, start: int, end: int):
        self.slot, self.start, self.end = slot, start, end

    def __repr__(self) -> str:
        return f"SeqSpan(slot={self.slot}, rows={self.start}:{self.end})"


def single_sequence(n_tokens: int, slot: int = 0) -> list[SeqSpan]:
    return [SeqSpan(slot, 0, n_tokens)]
