"""What every architecture's forward does the same way: batch inputs on the device, attention plans."""

from __future__ import annotations

import torch

from worker_orcd.engine.kv_cache import SeqSpan, single_sequence
from worker_orcd.kernels.attention import AttentionPlan, decode_plans, window_variants


def batch_inputs(tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSpan] | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[SeqSpan]]:
    """tokens and positions on `device` (from the host without a stream sync); no `seqs` means one sequence in
    slot 0. Plan attention with the positions as given (window_plans): reading them back would sync."""
    return _moved(tokens, device), _moved(positions, device), seqs or single_sequence(tokens.shape[0])


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


Plans = dict[int | None, AttentionPlan]


def window_plans(positions: torch.Tensor, seqs: list[SeqSpan], window: int | None, kv) -> Plans:
    """{window: plan for sliding-window layers, None: plan for full-attention layers}, made once per forward."""
    return window_variants(positions, seqs, kv, (window, None) if window is not None else (None,))


def static_plans(kv, slots: torch.Tensor, positions: torch.Tensor, window: int | None) -> Plans:
    """The same plans for a decode step of one row per sequence, from device tensors (no host sync)."""
    return decode_plans(kv, slots, positions, (window, None) if window is not None else (None,))
