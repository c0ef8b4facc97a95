"""Turning logits into the next token, for every row of a step at once, on the logits' device.

Order (as vLLM): logit bias, penalties (repetition over prompt and output, presence and frequency over the
output), then the argmax for greedy rows, or temperature, top-k, top-p, min-p and the draw for sampled ones.
Each sampled row's uniform comes from its request's own CPU generator, so a seed draws the same tokens on any
device and in any batch. Logprobs (`token_logprobs`) are the model's own: log_softmax of the raw logits,
before any of the above (vLLM's default, `raw_logprobs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker_orcd.engine.transfer import to_device

# Below this a temperature only overflows the scaled logits; it means greedy (as vLLM treats it).
MIN_TEMPERATURE = 1e-5
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias; vLLM clamps to it
MIN_LOGPROB = -9999.0  # what a -inf logprob is reported as (JSON has no -inf; vLLM's floor)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    # 1: off; every id seen in the prompt or the output: positive logits divided by it, negative ones multiplied
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # subtracted once from the logit of every id generated so far
    frequency_penalty: float = 0.0  # subtracted from an id's logit once per time it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2 <= getattr(self, name) <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if token < 0 or not (-LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                raise ValueError(f"logit_bias: token {token} must be >= 0 and its bias in [-100, 100], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class Logprob:
    """One position's logprob: the token there, its logprob, and the most likely tokens with theirs."""
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), most likely first


class TokenCounts:
    """One sequence's history for the penalties, on the device: how often each id was generated [vocab],
    and which ids appeared at all, prompt included [vocab]."""

    def __init__(self, prompt_ids: Sequence[int], vocab: int, device: torch.device):
        self.generated = torch.zeros(vocab, dtype=torch.int32, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if prompt_ids:  # index_fill_: the value goes to the kernel as it is (assigning True copies it, a sync)
            self.seen.index_fill_(0, to_device(list(prompt_ids), device, torch.long), True)


class Sampler:
    """One request's sampling state: its seeded generator, and its token counts when a penalty needs them."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = ()):
        params.validate()
        self.p = params
        self.gen = torch.Generator(device="cpu").manual_seed(params.seed)
        self.prompt = list(prompt_ids)
        self.counts: TokenCounts | None = None

    def draw(self) -> float:
        """The uniform this pick uses: the generator's next for a sampled pick; greedy draws nothing."""
        return 0.0 if self.p.greedy else torch.rand((), generator=self.gen).item()

    def counts_for(self, logits: torch.Tensor) -> TokenCounts | None:
        """The penalties' history, built on the logits' device at the first pick (None without a penalty)."""
        if self.counts is None and self.p.penalized:
            self.counts = TokenCounts(self.prompt, logits.shape[-1], logits.device)
        return self.counts

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick the next token from logits [vocab] (one row of `pick_rows`)."""
        return int(pick_rows(logits[None], [self.p], [self.draw()], [self.counts_for(logits)])[0])


def pick_rows(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float],
              counts: list[TokenCounts | None]) -> torch.Tensor:
    """The next token of every row of logits [B, vocab], as a long tensor [B] on their device (no transfer):
    bias, penalties, then greedy argmax or the filtered draw with the row's uniform. Penalized rows need their
    `counts`, which this advances by the picked token."""
    logits = logits.float()
    dev, B = logits.device, logits.shape[0]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if biased or penalized:
        logits = logits.clone()
    if biased:
        add_logit_bias(logits, biased, [params[i].logit_bias for i in biased])
    if penalized:
        rows = _index(penalized, B, dev)
        generated = torch.stack([counts[i].generated for i in penalized])
        seen = torch.stack([counts[i].seen for i in penalized])
        logits[rows] = apply_penalties(logits[rows], generated, seen, [params[i] for i in penalized])
    greedy = [i for i, p in enumerate(params) if p.greedy]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        picks = logits.argmax(-1)
    elif not greedy:
        picks = sample_rows(logits, params, uniforms)
    else:
        picks = torch.empty(B, dtype=torch.long, device=dev)
        picks[_index(greedy, B, dev)] = logits[_index(greedy, B, dev)].argmax(-1)
        rows = _index(sampled, B, dev)
        picks[rows] = sample_rows(logits[rows], [params[i] for i in sampled], [uniforms[i] for i in sampled])
    if penalized:
        new = picks[_index(penalized, B, dev)][:, None]
        generated.scatter_add_(1, new, torch.ones_like(new, dtype=torch.int32))
        seen.scatter_(1, new, True)
        for j, i in enumerate(penalized):  # each sequence keeps its row: a view, no copy
            counts[i].generated, counts[i].seen = generated[j], seen[j]
    return picks


def _index(rows: list[int], n: int, dev: torch.device) -> torch.Tensor | slice:
    return slice(None) if len(rows) == n else to_device(rows, dev, torch.long)


def add_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[tuple[tuple[int, float], ...]]) -> None:
    """Add each row's (id, bias) pairs to logits [B, vocab] in place: one indexed add for every row."""
    r = [i for i, bias in zip(rows, biases) for _ in bias]
    ids = [t for bias in biases for t, _ in bias]
    values = [b for bias in biases for _, b in bias]
    index = to_device([r, ids], logits.device, torch.long)
    logits.index_put_((index[0], index[1]), to_device(values, logits.device, torch.float32), accumulate=True)


def apply_penalties(logits: torch.Tensor, generated: torch.Tensor, seen: torch.Tensor,
                    params: list[SamplingParams]) -> torch.Tensor:
    """Penalties on logits [P, vocab] given each row's generated counts and seen ids [P, vocab] (vLLM's and HF's
    formulas): repetition scales the logits of seen ids toward zero, frequency and presence subtract."""
    dev = logits.device
    if any(p.repetition_penalty != 1.0 for p in params):
        rep = to_device([p.repetition_penalty for p in params], dev, torch.float32)[:, None]
        scale = torch.where(seen, rep, 1.0)
        logits = torch.where(logits > 0, logits / scale, logits * scale)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        freq = to_device([p.frequency_penalty for p in params], dev, torch.float32)[:, None]
        pres = to_device([p.presence_penalty for p in params], dev, torch.float32)[:, None]
        logits = logits - freq * generated - pres * (generated > 0)
    return logits


_HIGHEST = torch.finfo(torch.float32).max / 2
_LOWEST = -_HIGHEST


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
    """Temperature / top-k / top-p / min-p draws for every row of logits [B, vocab] at once, as a long tensor
    [B] on their device: the filters as masks over each row sorted once, then the inverse-CDF draw with each
    row's uniform."""
    dev = logits.device
    temps = to_device([p.temperature for p in params], dev, torch.float32)[:, None]
    # extreme penalties or biases can push logits to +-inf or NaN: clamp to finite so softmax stays a distribution
    scaled = torch.nan_to_num(logits.float() / temps, nan=_LOWEST, posinf=_HIGHEST, neginf=_LOWEST)
    sorted_logits, ids = torch.sort(scaled, dim=-1, descending=True, stable=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=dev)[None, :]
    top_k = to_device([p.top_k if 0 < p.top_k < V else V for p in params], dev, torch.long)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = to_device([p.top_p for p in params], dev, torch.float32)[:, None]
    # the smallest prefix whose mass reaches top_p; the most likely token always stays
    keep = ((probs.cumsum(-1) - probs) < top_p) | (rank == 0)
    min_p = to_device([p.min_p for p in params], dev, torch.float32)[:, None]
    keep &= (probs >= min_p * probs[:, :1]) | (rank == 0)
    probs = probs * keep
    cdf = (probs / probs.sum(-1, keepdim=True)).cumsum(-1)
    u = to_device(uniforms, dev, cdf.dtype)[:, None]
    kept = keep.sum(-1, keepdim=True)
    pick = torch.minimum(torch.searchsorted(cdf, u), kept - 1)
    return ids.gather(1, pick).squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's logprobs (log_softmax of the raw logits [R, vocab]) of `tokens` [R], and the k most likely
    ids of each row with theirs: ([R], [R, k] logprobs, [R, k] ids), on the logits' device."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.reshape(-1, 1)).squeeze(1)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return chosen, top, ids


def logprob_entries(tokens: list[int], chosen: torch.Tensor, top: torch.Tensor, ids: torch.Tensor,
                    ks: list[int]) -> list[Logprob]:
    """Host entries from `token_logprobs`' tensors (one transfer each), row i keeping its own ks[i] best."""
    chosen_l, top_l, ids_l = chosen.tolist(), top.tolist(), ids.tolist()
    return [Logprob(t, max(c, MIN_LOGPROB), [(j, max(v, MIN_LOGPROB)) for j, v in zip(ids_l[r][:k], top_l[r][:k])])
            for r, (t, c, k) in enumerate(zip(tokens, chosen_l, ks))]
