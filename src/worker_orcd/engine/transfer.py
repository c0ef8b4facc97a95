"""Host values to the device without waiting for it: pinned staging, then a non-blocking copy.

A plain `.to("cuda")` of a CPU tensor synchronizes the stream (torch waits for a blocking copy to finish), and a
non-blocking copy from pageable memory may too: either way the host stalls until the GPU has run everything
queued. The overlapped decode (engine/scheduler.py) queues step N + 1 before it handles step N's tokens, so
every value a step sends (tokens, positions, block tables, sampling parameters) goes through here.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`; on CUDA staged in pinned memory and copied without a sync."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
