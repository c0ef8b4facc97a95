"""Device memory: what a model will need before it loads, whether that fits, and proof of residency after.

The estimate is made from the GGUF header alone (no tensor byte is read), so a worker that cannot fit
refuses before it copies anything:
  weights    every matrix in its block format (plus the kernels' packed copy where one is kept),
             every vector as float32;
  KV cache   layers x slots x context x kv_heads x (key_length + value_length) x dtype bytes;
  workspace  one prefill chunk's activations and attention scores, the logits, and a fixed margin
             for the allocator and kernel scratch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from worker_orcd.gguf import GGUFFile

MARGIN_BYTES = 256 * 2**20  # allocator fragmentation, kernel scratch, cuBLAS workspace
MAX_LAYERS = 4096  # more blocks than any model has (the largest have ~200): a count past it is not believed


class InsufficientMemory(RuntimeError):
    """The model does not fit: the message names required bytes, available bytes and the device."""

    def __init__(self, required: int, available: int, device: str, why: str):
        self.required, self.available, self.device = required, available, device
        super().__init__(f"not enough memory on {device}: {required} bytes required ({human_bytes(required)}), "
                         f"{available} bytes available ({human_bytes(available)}, {why})")


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def parse_size(text: str) -> int:
    """'20GiB', '20G', '512MB', '1073741824' -> bytes (K/M/G/T are powers of 1024)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 20GiB or 512M)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a size: {text!r} (must be positive)")
    return int(value)


def _int(v: object) -> int | None:
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) else None


def _per_layer(v: object, layers: int) -> list[int] | None:
    """A head count for each layer: a number for all of them, or an integer array of one per layer."""
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu" and len(v) == layers:
        return [int(x) for x in v]
    n = _int(v)
    return None if n is None else [n] * layers


def _count(f: GGUFFile, key: str) -> int:
    """An integer hyperparameter (the largest entry of a per-layer array); 0 when absent or not an integer."""
    v = f.get(key)
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu" and v.size:
        return max(int(v.max()), 0)
    return max(_int(v) or 0, 0)


def kv_bytes_per_token(f: GGUFFile, dtype_bytes: int = 4) -> int:
    """K and V bytes one token takes in every layer (per-layer head counts summed; sliding-window layers keep
    full-length buffers); 0 when the metadata does not say. Hostile metadata gives 0, never an exception."""
    arch = f.architecture
    layers = _int(f.get(f"{arch}.block_count")) or 0
    heads = f.get(f"{arch}.attention.head_count")
    kv_heads = f.get(f"{arch}.attention.head_count_kv", heads)
    embd = _int(f.get(f"{arch}.embedding_length")) or 0
    key_len = _int(f.get(f"{arch}.attention.key_length"))
    value_len = _int(f.get(f"{arch}.attention.value_length"))
    if not 0 < layers <= MAX_LAYERS:  # a hostile count would make the per-layer lists below gigabytes long
        return 0
    if _int(heads) is not None and _int(kv_heads) is not None:  # the usual case: no per-layer list
        return layers * _layer_kv_bytes(_int(heads), _int(kv_heads), embd, key_len, value_len) * dtype_bytes
    per_layer = _per_layer(heads, layers), _per_layer(kv_heads, layers)
    if per_layer[0] is None or per_layer[1] is None:
        return 0
    return sum(_layer_kv_bytes(h, kv, embd, key_len, value_len) for h, kv in zip(*per_layer)) * dtype_bytes


def _layer_kv_bytes(heads: int, kv_heads: int, embd: int, key_len: int | None, value_len: int | None) -> int:
    head_k = key_len or (embd // heads if heads > 0 else 0)
    head_v = value_len or head_k
    return max(kv_heads * (head_k + head_v), 0)


def weight_bytes(f: GGUFFile) -> int:
    """Bytes the loaded tensors take: matrices in their block format (on CUDA, the kernels' repacking of
    the same size replaces the blocks), vectors expanded to float32. The CPU's packed copies for its own
    kernels (int4pack, bf16) are made on first use and not counted."""
    return sum(ref.n_elements * 4 if len(ref.shape) == 1 else ref.nbytes for ref in f.tensors.values())


def workspace_bytes(f: GGUFFile, ctx: int, slots: int, prefill_chunk: int) -> int:
    arch = f.architecture
    embd = _count(f, f"{arch}.embedding_length")
    ff = _count(f, f"{arch}.feed_forward_length")
    ff = max(ff, _count(f, f"{arch}.expert_feed_forward_length") * max(1, _count(f, f"{arch}.expert_used_count")))
    heads = _count(f, f"{arch}.attention.head_count")
    vocab = len(f.get("tokenizer.ggml.tokens") or []) or _count(f, f"{arch}.vocab_size")
    rows = prefill_chunk + slots
    activations = rows * (8 * embd + 3 * ff) * 4
    scores = heads * rows * ctx * 4  # attention scores when a kernel materializes them
    logits = rows * vocab * 4
    return activations + scores + logits + MARGIN_BYTES


def estimate(f: GGUFFile, ctx: int, slots: int, kv_dtype_bytes: int = 4,
             prefill_chunk: int = 256) -> MemoryEstimate:
    return MemoryEstimate(weights=weight_bytes(f),
                          kv_cache=kv_bytes_per_token(f, kv_dtype_bytes) * ctx * slots,
                          workspace=workspace_bytes(f, ctx, slots, prefill_chunk))


def free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device now; None elsewhere (CPU weights may be memory-mapped)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def check_fits(need: MemoryEstimate, device: torch.device, limit: int | None = None) -> None:
    """Raise InsufficientMemory when `need` exceeds `limit` (--vram-limit) or the device's free memory."""
    if limit is not None and need.total > limit:
        raise InsufficientMemory(need.total, limit, str(device), "--vram-limit")
    free = free_bytes(device)
    if free is not None and need.total > free:
        raise InsufficientMemory(need.total, free, str(device), "free on the device")


def model_tensors(obj: object) -> list[torch.Tensor]:
    """Every tensor a model holds (weights, fused matrices, kernels' packed copies), each once."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []

    def walk(x: object) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif type(x).__module__.startswith("worker_orcd.") and hasattr(x, "__dict__"):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    return found


def residency(net: object, device: torch.device) -> tuple[bool, int]:
    """(every tensor of `net` is on `device`, their bytes): what /health reports as proof that nothing
    fell back to the host."""
    on_device, total = True, 0
    for t in model_tensors(net):
        same = t.device.type == device.type and (device.index is None or t.device.index == device.index)
        on_device &= same
        total += t.numel() * t.element_size()
    return on_device, total
