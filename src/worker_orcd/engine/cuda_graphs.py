"""Decode steps replayed from CUDA graphs: one capture per KV-length bucket, then one launch per step.

Eager decode of a 24-layer MoE issues ~1,000 kernels per token, and the host (aten dispatch plus
cudaLaunchKernel) costs ~10x the GPU time of the kernels themselves. A model's `decode(tokens,
positions, slots, kv, length)` has shapes fixed by (batch, length) and never syncs with the host,
so it is captured once per length bucket into static input/output buffers and replayed.
Buckets keep attention's cost proportional to the context: a step at position 300 reads 1,024
cache positions, not the whole cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker_orcd.engine.kv_cache import KVCache

BUCKETS = (256, 1024, 4096, 16384, 65536)


def bucket_for(length: int, max_len: int) -> int:
    """The smallest bucket holding `length` cache positions, capped at the cache's length."""
    if length > max_len:
        raise ValueError(f"position {length - 1} is past the KV cache length {max_len}")
    return min(next((b for b in BUCKETS if b >= length), max_len), max_len)


class GraphedDecoder:
    """Batch-`batch_size` decode over `kv` through CUDA graphs. One row per sequence; each row's slot is
    an input, so any `batch_size` of the cache's slots can decode together."""

    def __init__(self, model, kv: KVCache, batch_size: int = 1, capture: bool = True):
        """capture=False runs the same static step eagerly (any device): what CPU tests check."""
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on CUDA, this one is on {model.device}")
        self.model, self.kv, self.batch_size, self.capture = model, kv, batch_size, capture
        # tokens, positions, slots in one buffer: one host-to-device copy per step
        self.inputs = torch.zeros(3, batch_size, dtype=torch.long, device=model.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def step(self, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int],
             slots: Sequence[int]) -> torch.Tensor:
        """Logits [batch_size, vocab] float32 for one new token per row. `positions` are host values (they pick
        the bucket); `tokens` may be a CUDA tensor (sampled on the GPU). The result is the graph's output
        buffer: valid until the next step."""
        positions = [int(p) for p in positions]
        slots = [int(s) for s in slots]
        if len(positions) != self.batch_size or len(slots) != self.batch_size:
            raise ValueError(f"step needs {self.batch_size} rows, got {len(positions)} positions, {len(slots)} slots")
        length = bucket_for(max(positions) + 1, self.kv.max_len)
        # a pageable source is staged by the driver before copy_ returns, so the list may go right away
        if isinstance(tokens, torch.Tensor) and tokens.is_cuda:
            self.inputs[1:].copy_(torch.tensor([positions, slots]), non_blocking=True)
            self.inputs[0].copy_(tokens.reshape(-1))
        else:
            self.inputs.copy_(torch.tensor([[int(t) for t in tokens], positions, slots]), non_blocking=True)
        if not self.capture:
            tokens, positions, slots = self.inputs
            return self.model.decode(tokens, positions, slots, self.kv, length)
        if length not in self.graphs:
            self.graphs[length] = self._capture(length)
        graph, logits = self.graphs[length]
        graph.replay()
        return logits

    def _capture(self, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Run the step once eagerly (Triton compiles, weights repack: neither may happen inside a capture),
        then capture it. The eager run writes the same K/V the replay will, so it changes nothing."""
        tokens, positions, slots = self.inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.decode(tokens, positions, slots, self.kv, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model.decode(tokens, positions, slots, self.kv, length)
        return graph, logits


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class BucketedDecoder:
    """Decode steps for any number of sequences: rows are padded to the next batch bucket (one graph set per
    bucket), the padding rows decoding position 0 of a scratch KV slot that no sequence owns."""

    def __init__(self, model, kv: KVCache, scratch_slot: int, capture: bool = True):
        self.model, self.kv, self.scratch, self.capture = model, kv, scratch_slot, capture
        self.decoders: dict[int, GraphedDecoder] = {}

    def step(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """Logits [len(tokens), vocab] (a view of the bucket's output buffer: valid until the next step)."""
        n = len(tokens)
        size = next((b for b in BATCH_BUCKETS if b >= n), n)
        pad = size - n
        if size not in self.decoders:
            self.decoders[size] = GraphedDecoder(self.model, self.kv, size, self.capture)
        logits = self.decoders[size].step([*tokens, *[0] * pad], [*positions, *[0] * pad],
                                          [*slots, *[self.scratch] * pad])
        return logits[:n]
