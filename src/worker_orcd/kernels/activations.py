"""Feed-forward activations (torch references)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up — the Llama-family FFN activation."""
    return F.silu(gate) * up


def gelu(x: torch.Tensor, approximate: bool) -> torch.Tensor:
    """GELU: exact erf form, or the tanh approximation GPT-2 and Gemma were trained with."""
    if approximate:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up — Gemma's FFN activation."""
    return gelu(gate, approximate=True) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """GPT-OSS: gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)
