"""Perplexity the way llama-perplexity measures it.

The text's tokens are cut into windows of `ctx`; each window is evaluated fresh (its first token
replaced by BOS when the model adds one), and only the second half is scored: the logits after
position j predict token j+1 for j in [ctx/2, ctx-1), so every scored token has at least ctx/2
tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class PerplexityResult:
    ppl: float
    n_scored: int
    n_windows: int
    ctx: int
    window_ppl: list[float] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)  # argmax at each scored position, in order


def window_tokens(tokens: list[int], ctx: int, bos_id: int | None, max_windows: int | None = None) -> list[list[int]]:
    n = len(tokens) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity needs at least ctx={ctx}")
    windows = [list(tokens[k * ctx : (k + 1) * ctx]) for k in range(n)]
    if bos_id is not None:
        for w in windows:
            w[0] = bos_id
    return windows


def perplexity(
    logits_fn: Callable[[list[int]], torch.Tensor],  # ids -> float32 [len(ids), vocab]
    tokens: list[int],
    ctx: int = 512,
    bos_id: int | None = None,
    max_windows: int | None = None,
    on_window: Callable[[int, int, float], None] | None = None,
) -> PerplexityResult:
    first = ctx // 2
    nll_total, n_total = 0.0, 0
    result = PerplexityResult(ppl=math.nan, n_scored=0, n_windows=0, ctx=ctx)
    windows = window_tokens(tokens, ctx, bos_id, max_windows)
    for k, w in enumerate(windows):
        logits = logits_fn(w)[first : ctx - 1].double()
        targets = torch.tensor(w[first + 1 : ctx], dtype=torch.long)
        nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        nll_total += float(nll.sum())
        n_total += nll.numel()
        result.window_ppl.append(math.exp(float(nll.mean())))
        result.top1.extend(logits.argmax(-1).tolist())
        if on_window is not None:
            on_window(k + 1, len(windows), math.exp(nll_total / n_total))
    result.ppl = math.exp(nll_total / n_total)
    result.n_scored, result.n_windows = n_total, len(windows)
    return result
