"""The paged KV pool's bookkeeping on the host: fixed-size blocks, a block table per sequence, a free list.

No tensors here (engine/kv_cache.py holds the device side). A sequence's table grows a block at a time
as it gets longer and goes back to the free list whole when it ends.
"""

from __future__ import annotations


class KVCacheFull(RuntimeError):
    """The pool has no free block for a sequence that needs one."""


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"need n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._tables: dict[int, list[int]] = {}

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def table(self, seq: int) -> list[int]:
        return self._tables.get(seq, [])

    def can_hold(self, seq: int, n_tokens: int) -> bool:
        """Whether `seq` could grow to n_tokens positions with the blocks free now."""
        return self.blocks_for(n_tokens) - len(self.table(seq)) <= len(self._free)

    def ensure(self, seq: int, n_tokens: int) -> list[int]:
        """Grow seq's table to cover n_tokens positions; returns the blocks added (maybe none)."""
        table = self._tables.setdefault(seq, [])
        need = self.blocks_for(n_tokens) - len(table)
        if need <= 0:
            return []
        if need > len(self._free):
            raise KVCacheFull(f"the KV pool has {len(self._free)} free blocks, sequence {seq} needs {need} more")
        new = [self._free.pop() for _ in range(need)]
        table.extend(new)
        return new

    def release(self, seq: int) -> None:
        self._free.extend(reversed(self._tables.pop(seq, [])))
