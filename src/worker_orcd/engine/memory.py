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

import torch

from worker_orcd.gguf import GGUFFile

MARGIN_BYTES = 256 * 2**20  # allocator fragmentation, kernel scratch, cuBLAS workspace


class InsufficientMemory(RuntimeError):
    """The model does not fit: the message names required bytes, available bytes and the device."""

    def __init__(self, required: int, available: int, device: str, why: str):
        self.required, self.available, self.device = required, available, device
        super().__init__(f"not enough memory on {device}: {required} bytes required ({human(required)}), "
                         f"{available} bytes available ({human(available)}, {why})")


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
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


def _meta_int(f: GGUFFile, key: str, default: int = 0) -> int:
    v = f.get(key)
    if v is None:
        return default
    if hasattr(v, "flat"):  # per-layer arrays: the largest entry bounds the memory
        return int(max(v.flat)) if v.size else default
    return int(v)


def kv_bytes_per_token(f: GGUFFile, dtype_bytes: int = 4) -> int:
    """K and V bytes one token takes in every layer (sliding-window layers keep full-length buffers)."""
    arch = f.architecture
    layers = _meta_int(f, f"{arch}.block_count")
    heads = _meta_int(f, f"{arch}.attention.head_count")
    kv_heads = _meta_int(f, f"{arch}.attention.head_count_kv", heads)
    embd = _meta_int(f, f"{arch}.embedding_length")
    head_k = _meta_int(f, f"{arch}.attention.key_length", embd // heads if heads else 0)
    head_v = _meta_int(f, f"{arch}.attention.value_length", head_k)
    return layers * kv_heads * (head_k + head_v) * dtype_bytes


def weight_bytes(f: GGUFFile) -> int:
    """Bytes the loaded tensors take: matrices in their block format (on CUDA, the kernels' repacking of
    the same size replaces the blocks), vectors expanded to float32. The CPU's packed copies for its own
    kernels (int4pack, bf16) are made on first use and not counted."""
    return sum(ref.n_elements * 4 if len(ref.shape) == 1 else ref.nbytes for ref in f.tensors.values())


def workspace_bytes(f: GGUFFile, ctx: int, slots: int, prefill_chunk: int) -> int:
    arch = f.architecture
    embd = _meta_int(f, f"{arch}.embedding_length")
    ff = _meta_int(f, f"{arch}.feed_forward_length")
    ff = max(ff, _meta_int(f, f"{arch}.expert_feed_forward_length") * max(1, _meta_int(f, f"{arch}.expert_used_count")))
    heads = _meta_int(f, f"{arch}.attention.head_count")
    vocab = len(f.get("tokenizer.ggml.tokens") or []) or _meta_int(f, f"{arch}.vocab_size")
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
