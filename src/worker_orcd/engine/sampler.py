"""Turning logits into the next token: greedy, or temperature with top-k / top-p / min-p filters.

Order (as HF transformers and vLLM): repetition penalty, temperature, top-k, top-p, min-p, draw.
The draw uses a per-request CPU generator, so a seed gives the same tokens on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Below this a temperature only overflows the scaled logits; it means greedy (as vLLM treats it).
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; llama.cpp's rule: divide positive logits, multiply negative
    repeat_last_n: int = 64
    seed: int = 0

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.gen = torch.Generator(device="cpu").manual_seed(params.seed)

    def draw(self) -> float:
        """The next uniform of this request's generator (what __call__ draws for a sampled pick)."""
        return torch.rand((), generator=self.gen).item()

    @property
    def batchable(self) -> bool:
        """A sampled pick that sample_rows can make together with other rows (no penalty on the history)."""
        return self.p.temperature >= MIN_TEMPERATURE and self.p.repetition_penalty == 1.0

    @property
    def greedy(self) -> bool:
        """Whether the pick is the plain argmax (no penalty changes the logits first)."""
        return self.p.temperature < MIN_TEMPERATURE and self.p.repetition_penalty == 1.0

    def __call__(self, logits: torch.Tensor, history: list[int] | None = None) -> int:
        """Pick the next token from logits [vocab]; history holds the ids so far (for the penalty)."""
        p = self.p
        logits = logits.float()
        if p.repetition_penalty != 1.0 and history:
            logits = apply_repetition_penalty(logits, history[-p.repeat_last_n :], p.repetition_penalty)
        if p.temperature < MIN_TEMPERATURE:
            return int(torch.argmax(logits))
        u = torch.rand((), generator=self.gen).item()  # drawn even if filters leave one token: seeds stay aligned
        probs, ids = filtered_probs(logits / p.temperature, p.top_k, p.top_p, p.min_p)
        return sample_from(probs, ids, u)


def apply_repetition_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filtered_probs(
    logits: torch.Tensor, top_k: int, top_p: float, min_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after the filters, as (sorted descending probs, their token ids)."""
    sorted_logits, ids = torch.sort(logits, descending=True)
    if 0 < top_k < sorted_logits.shape[0]:
        sorted_logits = sorted_logits[:top_k]
        ids = ids[:top_k]
    probs = torch.softmax(sorted_logits, dim=-1)
    if top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p; the most likely token always stays
        # (a top_p below float32's range would otherwise compare as 0 and keep nothing)
        keep = (probs.cumsum(-1) - probs) < top_p
        keep[0] = True
        probs, ids = probs[keep], ids[keep]
    if min_p > 0.0:
        keep = probs >= min_p * probs[0]
        probs, ids = probs[keep], ids[keep]
    return probs / probs.sum(), ids


def sample_from(probs: torch.Tensor, ids: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw with a uniform u in [0, 1)."""
    idx = int(torch.searchsorted(probs.cumsum(-1), torch.tensor([u], dtype=probs.dtype, device=probs.device)))
    return int(ids[min(idx, ids.shape[0] - 1)])


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> list[int]:
    """Temperature / top-k / top-p / min-p draws for every row of logits [B, vocab] at once, on the logits'
    device, with one transfer back: the filters of `filtered_probs` as masks over each row sorted once, then
    the inverse-CDF draw with each row's uniform (drawn by its request's own generator: seeds give the same
    draws on any device). Rows with a repetition penalty go through `Sampler` instead."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    sorted_logits, ids = torch.sort(logits.float() / temps, dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=dev)[None, :]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=dev)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    keep = ((probs.cumsum(-1) - probs) < top_p) | (rank == 0)  # the most likely token always stays
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    keep &= probs >= min_p * probs[:, :1]
    probs = probs * keep
    cdf = (probs / probs.sum(-1, keepdim=True)).cumsum(-1)
    u = torch.tensor(uniforms, dtype=cdf.dtype, device=dev)[:, None]
    kept = keep.sum(-1, keepdim=True)
    pick = torch.minimum(torch.searchsorted(cdf, u), kept - 1)
    return ids.gather(1, pick).squeeze(1).tolist()
