"""Token and absolute position embeddings (torch reference)."""

from __future__ import annotations

import torch


def absolute_position_embedding(
    token_vectors: torch.Tensor, table: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """GPT-2's input: token vectors [T, D] plus the learned row of each position, table [n_positions, D]."""
    if positions.numel() and int(positions.max()) >= table.shape[0]:
        raise ValueError(f"position {int(positions.max())} is past the {table.shape[0]} learned positions")
    return token_vectors + table[positions].to(token_vectors.dtype)
