"""Decode steps replayed from CUDA graphs: one capture per batch size, then one launch per step.

Eager decode of a 24-layer MoE issues hundreds of kernels per token and the host (aten dispatch plus
cudaLaunchKernel) costs more than the kernels themselves. A model's `decode(tokens, positions, slots, kv)`
has shapes fixed by the batch size and never syncs with the host: the paged attention kernel takes each
row's position and block table from device memory, so one graph serves every context length. Inputs
live in static buffers; the host only prepares KV blocks (kv.prepare) and copies tokens, positions and
slots in before each replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.transfer import to_device


class GraphedDecoder:
    """Batch-`batch_size` decode over `kv` through a CUDA graph. One row per sequence; each row's slot is an
    input, so any `batch_size` of the cache's slots can decode together."""

    def __init__(self, model, kv: KVCache, batch_size: int = 1, capture: bool = True, pool=None):
        """capture=False runs the same static step eagerly (any device): what CPU tests check."""
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on CUDA, this one is on {model.device}")
        self.model, self.kv, self.batch_size, self.capture = model, kv, batch_size, capture
        # tokens, positions, slots in one buffer: one host-to-device copy per step
        self.inputs = torch.zeros(3, batch_size, dtype=torch.long, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.pool = pool

    def step(self, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int],
             slots: Sequence[int]) -> torch.Tensor:
        """Logits [batch_size, vocab] float32 for one new token per row. `tokens` may be a CUDA tensor (sampled
        on the GPU). The result is the graph's output buffer: valid until the next step."""
        positions = [int(p) for p in positions]
        slots = [int(s) for s in slots]
        if len(positions) != self.batch_size or len(slots) != self.batch_size:
            raise ValueError(f"step needs {self.batch_size} rows, got {len(positions)} positions, {len(slots)} slots")
        for s, p in zip(slots, positions):
            self.kv.prepare(s, p + 1)
        # staged in pinned memory: a copy that waited for the GPU would undo the scheduler's overlapped steps
        dev = self.inputs.device
        if isinstance(tokens, torch.Tensor):
            self.inputs[1:].copy_(to_device([positions, slots], dev, torch.long))
            self.inputs[0].copy_(tokens.reshape(-1))
        else:
            self.inputs.copy_(to_device([[int(t) for t in tokens], positions, slots], dev, torch.long))
        if not self.capture:
            return self.model.decode(*self.inputs, self.kv)
        if self.graph is None:
            self.capture_now()
        self.graph.replay()
        return self.logits

    def capture_now(self) -> None:
        """Run the step once eagerly (Triton compiles: it may not happen inside a capture), then capture it.
        The inputs must point at prepared blocks; the capture writes the same K/V the eager run did."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.decode(*self.inputs, self.kv)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.logits = self.model.decode(*self.inputs, self.kv)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class BucketedDecoder:
    """Decode steps for any number of sequences: rows are padded to the next batch bucket (one graph per
    bucket, all in one memory pool), the padding rows decoding position 0 of a scratch KV slot that no
    sequence owns."""

    def __init__(self, model, kv: KVCache, scratch_slot: int, capture: bool = True, max_batch: int | None = None):
        self.model, self.kv, self.scratch, self.capture = model, kv, scratch_slot, capture
        self.decoders: dict[int, GraphedDecoder] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.max_batch = max_batch

    def bucket(self, n: int) -> int:
        return next((b for b in BATCH_BUCKETS if b >= n), n)

    def warm_up(self) -> None:
        """Capture every bucket up to max_batch now (start-up), largest first so the pool is sized once."""
        sizes = [b for b in BATCH_BUCKETS if b <= self.bucket(self.max_batch or 1)]
        for size in reversed(sizes):
            self.step([0] * size, [0] * size, [self.scratch] * size)

    def step(self, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int], slots: Sequence[int]
             ) -> torch.Tensor:
        """Logits [len(tokens), vocab] (a view of the bucket's output buffer: valid until the next step).
        `tokens` may be a tensor on the model's device (the previous step's picks)."""
        n = len(tokens)
        size = self.bucket(n)
        pad = size - n
        if size not in self.decoders:
            self.decoders[size] = GraphedDecoder(self.model, self.kv, size, self.capture, self.pool)
        if isinstance(tokens, torch.Tensor):
            tokens = torch.cat([tokens.reshape(-1), tokens.new_zeros(pad)]) if pad else tokens
        else:
            tokens = [*tokens, *[0] * pad]
        logits = self.decoders[size].step(tokens, [*positions, *[0] * pad], [*slots, *[self.scratch] * pad])
        return logits[:n]
