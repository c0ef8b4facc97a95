"""The KV cache: one paged pool per layer, K and V [blocks, kv_heads, block_size, head_dim].

Position p of the sequence held in slot s lives in block `table[s][p // block_size]` at offset
`p % block_size`. Blocks are handed out on demand by the host-side BlockManager (engine/block_manager.py),
so a short sequence holds few blocks and the pool is sized by tokens, not by slots x context.
On CPU the default block is the whole context (one block per slot: reads are views, no gathers);
on CUDA blocks are 16 positions and the attention kernel follows each sequence's block table. A new sequence
may start with a cached prefix (`reuse_prefix`): shared blocks on CUDA, rows copied into its block on CPU.
"""

from __future__ import annotations

import torch

from worker_orcd.engine.block_manager import BlockManager
from worker_orcd.engine.transfer import to_device

GPU_BLOCK_SIZE = 16


def kv_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 K/V on CUDA (the kernels accumulate in float32); float32 on CPU, where it is exact and fastest."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


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
        block_size: int | None = None,
        n_blocks: int | None = None,
    ):
        """A pool for `n_slots` sequences of up to `max_len` positions each; `n_blocks` (default: enough for
        every slot to reach max_len) bounds how many positions all of them hold together."""
        device = torch.device(device)
        self.max_len = max_len
        self.n_slots = n_slots
        self.block_size = block_size or (GPU_BLOCK_SIZE if device.type == "cuda" else max_len)
        self.max_blocks = -(-max_len // self.block_size)  # per sequence
        n_blocks = n_blocks or n_slots * self.max_blocks
        self.blocks = BlockManager(n_blocks, self.block_size)
        shape_k = (n_blocks, n_kv_heads, self.block_size, head_dim)
        shape_v = (n_blocks, n_kv_heads, self.block_size, head_dim_v or head_dim)
        self.k = [torch.zeros(shape_k, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape_v, dtype=dtype, device=device) for _ in range(n_layers)]
        # every slot's block table on the device (what the attention kernels read); unused entries are 0
        self.tables = torch.zeros(n_slots, self.max_blocks, dtype=torch.int32, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def prepare(self, slot: int, length: int) -> None:
        """Make sure slot's blocks cover positions 0..length-1 (raises KVCacheFull when the pool is out)."""
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is past the KV cache length {self.max_len}")
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"KV slot {slot} is not in [0, {self.n_slots})")
        have = len(self.blocks.table(slot))
        new = self.blocks.ensure(slot, length)
        if new:
            self.tables[slot, have : have + len(new)] = to_device(new, self.device, torch.int32)

    def reuse_prefix(self, slot: int, tokens: list[int], n_pages: int, tags: list[bytes | None] = ()) -> int:
        """Start slot's table with the first n_pages cached pages of `tokens` (blocks.cached_pages said they
        are, with the same page tags); returns how many positions that covers."""
        copy = self.blocks.share(slot, tokens, n_pages, tags)
        table = self.blocks.table(slot)
        if table:
            self.tables[slot, : len(table)] = to_device(table, self.device, torch.int32)
        if copy is not None:
            src, dst, n = copy
            for pool in self.k + self.v:
                pool[dst, :, :n] = pool[src, :, :n]
        return n_pages * self.blocks.page

    def release(self, slot: int) -> None:
        """The slot's blocks go back to the pool (its sequence ended)."""
        self.blocks.release(slot)

    def locate(self, slots: list[int], positions: list[int]) -> tuple[list[int], list[int]]:
        """(block, offset) of each (slot, position), host lists; the blocks must be prepared."""
        bs = self.block_size
        tables = {s: self.blocks.table(s) for s in set(slots)}
        return [tables[s][p // bs] for s, p in zip(slots, positions)], [p % bs for p in positions]

    def write_rows(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim]: row t goes to block blocks[t] at offset offsets[t]."""
        dtype = self.k[layer].dtype
        self.k[layer][blocks, :, offsets] = k if k.dtype == dtype else k.to(dtype)
        self.v[layer][blocks, :, offsets] = v if v.dtype == dtype else v.to(dtype)

    def read(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [kv_heads, length, head_dim] for positions 0..length-1 of `slot`: views when they lie in one
        block, else the slot's blocks concatenated."""
        table = self.blocks.table(slot)
        n = -(-length // self.block_size)
        if n == 1:
            return self.k[layer][table[0], :, :length], self.v[layer][table[0], :, :length]
        idx = to_device(table[:n], self.device)
        k = self.k[layer][idx].transpose(0, 1).flatten(1, 2)  # [Hkv, n * block_size, hd]
        v = self.v[layer][idx].transpose(0, 1).flatten(1, 2)
        return k[:, :length], v[:, :length]


class SeqSpan:
    """Rows [start, end) of a batch belong to the sequence held in KV cache `slot`."""

    __slots__ = ("slot", "start", "end")

    def __init__(self, slot: int, start: int, end: int):
        self.slot, self.start, self.end = slot, start, end

    def __repr__(self) -> str:
        return f"SeqSpan(slot={self.slot}, rows={self.start}:{self.end})"


def single_sequence(n_tokens: int, slot: int = 0) -> list[SeqSpan]:
    return [SeqSpan(slot, 0, n_tokens)]
