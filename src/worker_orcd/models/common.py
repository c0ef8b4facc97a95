"""What every architecture's forward does the same way: batch inputs on the device, attention plans."""

from __future__ import annotations

import torch

from worker_orcd.engine.kv_cache import SeqSpan, single_sequence
from worker_orcd.kernels.attention import AttentionPlan, plan_attention


def batch_inputs(tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSpan] | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[SeqSpan]]:
    """tokens and positions on `device`; no `seqs` means one sequence in slot 0."""
    return tokens.to(device), positions.to(device), seqs or single_sequence(tokens.shape[0])


def window_plans(positions: torch.Tensor, seqs: list[SeqSpan], window: int, max_len: int) -> dict[bool, AttentionPlan]:
    """{True: the plan for sliding-window layers, False: for full-attention layers}, each made once per forward."""
    return {True: plan_attention(positions, seqs, window, max_len),
            False: plan_attention(positions, seqs, None, max_len)}

