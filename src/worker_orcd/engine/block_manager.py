"""The paged KV pool's bookkeeping on the host: fixed-size blocks, a block table per sequence, reference
counts, and the prefix cache.

No tensors here (engine/kv_cache.py holds the device side). A sequence's table grows a block at a time as it
gets longer. The prefix cache works in pages of PAGE positions: once a sequence's KV holds a full page, the
page is registered under a hash chained over every token id up to the page's end (a pool serves one model,
so the ids alone say what the KV holds). A new sequence looks its prompt up page by page and takes the
longest run found:
- where a block is one page (CUDA), the run's blocks join its table by reference (reference counts);
- where a block is a whole context (CPU, so attention reads views), it takes the block holding the run if no
  sequence holds that block, else a fresh block into which the caller copies the run's rows.
A sequence only writes positions past its run, so a shared page is never written. Blocks no sequence holds
wait on a free list in LRU order, their pages still registered until the block is handed out again.

A page's key also names how its KV was computed (its tag), because a reused page must hold the bits the new
prompt would have computed itself: b"" where every row met kernels whose rows do not depend on the others
(decode kernels, CPU), `chunk_tag` where a long prompt chunk computed it whole with kernels whose rows do
(CUDA's cuBLAS and grouped-GEMM chunks: the chunk's span and all its ids), None where a page mixes the two (it
is never registered). The scheduler gives each sequence's prompt page tags (pages past them are b"").
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict

PAGE = 16  # positions per prefix-cache page (the CUDA block size)


class KVCacheFull(RuntimeError):
    """The pool has no free block for a sequence that needs one."""


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int, caching: bool = False):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"need n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.caching = caching  # register pages and look prompts up (the scheduler's --no-prefix-cache)
        self.page = min(PAGE, block_size)
        self.by_reference = self.page == block_size  # else a run is claimed or copied (one block per context)
        self.refs = [0] * n_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n_blocks))  # LRU first
        self._tables: dict[int, list[int]] = {}
        self._cached: dict[bytes, tuple[int, int]] = {}  # page hash -> (block, page within the block)
        self._pages: dict[int, dict[int, bytes]] = {}  # block -> {page within the block: hash} it registered
        self._chains: dict[int, list[bytes]] = {}  # seq -> hashes of its pages registered so far, in order
        self._tags: dict[int, list[bytes | None]] = {}  # seq -> its prompt pages' tags (the module doc)

    @property
    def n_free(self) -> int:
        """Blocks no sequence holds (some still hold cached pages: they go, least recently freed first)."""
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self._free)

    @property
    def n_cached(self) -> int:
        """Free blocks that still hold registered pages."""
        return sum(1 for b in self._free if b in self._pages)

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
        new = [self._take() for _ in range(need)]
        table.extend(new)
        return new

    def release(self, seq: int) -> None:
        """The sequence's blocks lose a reference; those left unheld go free, tail first, so a prefix outlives
        its tail. Blocks holding no registered page go to the front: they are handed out before cached ones."""
        self._chains.pop(seq, None)
        self._tags.pop(seq, None)
        for b in reversed(self._tables.pop(seq, [])):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free[b] = None
                if b not in self._pages:
                    self._free.move_to_end(b, last=False)

    # -- the prefix cache -------------------------------------------------------------------------

    def cached_pages(self, tokens: list[int], tags: list[bytes | None] = ()) -> int:
        """How many whole pages at the start of `tokens`, computed as `tags` say, are cached (never the page of
        the last token: its logits must be computed)."""
        if not self.caching:
            return 0
        n = 0
        for h in self._hashes(tokens, self._max_pages(len(tokens) - 1), tags):
            if h not in self._cached:
                break
            n += 1
        return n

    def share(self, seq: int, tokens: list[int], n_pages: int, tags: list[bytes | None] = ()
              ) -> tuple[int, int, int] | None:
        """Start seq's table with the first n_pages cached pages of `tokens` (cached_pages said so, with the same
        tags: they stay seq's for commit). Returns (source block, destination block, positions) when the caller
        must copy those rows, else None."""
        if seq in self._tables:
            raise ValueError(f"sequence {seq} already holds blocks")
        hashes = self._hashes(tokens, n_pages, tags)
        if len(hashes) < n_pages:
            raise ValueError(f"page {len(hashes)} of sequence {seq} mixes computations: it cannot be shared")
        self._tables[seq], self._chains[seq], self._tags[seq] = [], hashes, list(tags)
        if not hashes:
            return None
        found = [self._cached[h] for h in hashes]
        if self.by_reference:
            for b, _ in found:
                self._hold(b)
            self._tables[seq] = [b for b, _ in found]
            return None
        src = found[-1][0]  # the block of the run's last page holds the whole run (pages i at page i)
        if self.refs[src] == 0:  # nobody holds it: take it over; its pages past the run will be overwritten
            self._hold(src)
            self._forget(src, keep=n_pages)
            self._tables[seq] = [src]
            return None
        dst = self._take()
        self._tables[seq] = [dst]
        for i, h in enumerate(hashes):
            self._register(h, dst, i)
        return src, dst, n_pages * self.page

    def commit(self, seq: int, tokens: list[int]) -> None:
        """Register seq's full pages among `tokens`, the ids at positions 0.. whose KV is written (as far as its
        blocks go: a stand-in model that keeps no KV holds none)."""
        if not self.caching:
            return
        chain = self._chains.setdefault(seq, [])
        table = self._tables.get(seq, [])
        per_block = self.block_size // self.page
        tags = self._tags.get(seq, ())
        n = min(self._max_pages(len(tokens)), len(table) * per_block)
        for i in range(len(chain), n):
            tag = _tag(tags, i)
            if tag is None:  # a page of mixed computations: it and the pages after it stay unregistered
                return
            h = _page_hash(chain[-1] if chain else b"", tokens[i * self.page : (i + 1) * self.page], tag)
            self._register(h, table[i // per_block], i % per_block)
            chain.append(h)

    def _max_pages(self, n_tokens: int) -> int:
        """Pages a run may span: any number by reference, else those of one block (the run is one block's)."""
        n = n_tokens // self.page
        return n if self.by_reference else min(n, self.block_size // self.page)

    def _hashes(self, tokens: list[int], n_pages: int, tags: list[bytes | None] = ()) -> list[bytes]:
        """The keys of the first n_pages pages (fewer: up to the first page of mixed computations)."""
        out, prev = [], b""
        for i in range(n_pages):
            tag = _tag(tags, i)
            if tag is None:
                break
            prev = _page_hash(prev, tokens[i * self.page : (i + 1) * self.page], tag)
            out.append(prev)
        return out

    def _take(self) -> int:
        """The least recently freed block, its cached pages forgotten."""
        b, _ = self._free.popitem(last=False)
        self._forget(b)
        self.refs[b] = 1
        return b

    def _hold(self, b: int) -> None:
        if self.refs[b] == 0:
            del self._free[b]
        self.refs[b] += 1

    def _register(self, h: bytes, block: int, page: int) -> None:
        self._cached[h] = (block, page)  # the newest copy wins; an older one stays until its block goes
        self._pages.setdefault(block, {})[page] = h

    def _forget(self, block: int, keep: int = 0) -> None:
        """Unregister block's pages from `keep` on."""
        pages = self._pages.get(block, {})
        for page in [p for p in pages if p >= keep]:
            h = pages.pop(page)
            if self._cached.get(h) == (block, page):
                del self._cached[h]
        if not pages:
            self._pages.pop(block, None)


def _tag(tags: list[bytes | None], i: int) -> bytes | None:
    """Page i's tag: b"" past the prompt's pages (decode rows)."""
    return tags[i] if i < len(tags) else b""


def _page_hash(prev: bytes, ids: list[int], tag: bytes = b"") -> bytes:
    """A page's key: its ids and tag chained to the previous page's key (so it names the whole prefix)."""
    return hashlib.blake2b(prev + array("q", ids).tobytes() + tag, digest_size=16).digest()


def chunk_tag(start: int, end: int, ids: list[int]) -> bytes:
    """The tag of a page that the prompt chunk [start, end) computed whole, `ids` the chunk's ids."""
    return b"c" + struct.pack("<qq", start, end) + hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).digest()
