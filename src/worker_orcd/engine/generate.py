"""The generate loop: prefill the prompt, then decode one token at a time until a stop."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from worker_orcd.engine.sampler import Sampler, SamplingParams
from worker_orcd.engine.stop import StopMatcher


@dataclass
class Step:
    token: int | None  # None on the final step when a stop string ended the text
    text: str  # the UTF-8-complete text this step releases (may be empty)
    finish_reason: str | None = None  # "eos" | "stop_sequence" | "max_tokens" on the last step


def generate_steps(
    model,  # a models/* model: forward(tokens, positions, kv, logit_rows=...) and new_kv_cache(max_len)
    tokenizer,
    prompt_ids: list[int],
    max_tokens: int,
    params: SamplingParams,
    stop: list[str] | None = None,
    max_len: int | None = None,
) -> Iterator[Step]:
    """Yields one Step per generated token; the last Step has a finish_reason."""
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    ctx = max_len or model.cfg.context_length
    if len(prompt_ids) >= ctx:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {ctx}")
    max_tokens = min(max_tokens, ctx - len(prompt_ids))
    sampler = Sampler(params, prompt_ids)
    kv = model.new_kv_cache(len(prompt_ids) + max_tokens)
    decoder = tokenizer.stream_decoder(continuation=True)  # generated text keeps a leading space
    stops = StopMatcher(stop)
    history = list(prompt_ids)

    tokens = torch.tensor(prompt_ids, dtype=torch.long)
    positions = torch.arange(len(prompt_ids))
    logits = model.forward(tokens, positions, kv, logit_rows=torch.tensor([len(prompt_ids) - 1]))[-1]
    decode = _decoder(model, kv)
    for i in range(max_tokens):
        token = sampler(logits)
        history.append(token)
        if token in tokenizer.eog_ids:
            yield _last_step(token, "", decoder, stops, "eos")
            return
        text = stops.push(decoder.push(token))
        if stops.stopped:
            yield Step(token, text, "stop_sequence")
            return
        if i == max_tokens - 1:
            yield _last_step(token, text, decoder, stops, "max_tokens")
            return
        yield Step(token, text)
        logits = decode(token, len(history) - 1)


def _decoder(model, kv) -> Callable[[int, int], torch.Tensor]:
    """decode(token, position) -> logits [vocab]: CUDA-graph replays where the model has a static decode step
    and lives on CUDA (WORKER_ORCD_CUDA_GRAPHS=0 turns them off), else the eager forward."""
    on_cuda = torch.device(getattr(model, "device", "cpu")).type == "cuda"
    if on_cuda and hasattr(model, "decode") and os.environ.get("WORKER_ORCD_CUDA_GRAPHS", "1") != "0":
        from worker_orcd.engine.cuda_graphs import GraphedDecoder

        graphed = GraphedDecoder(model, kv, batch_size=1)
        return lambda token, pos: graphed.step([token], [pos], [0])[-1]
    return lambda token, pos: model.forward(torch.tensor([token]), torch.tensor([pos]), kv)[-1]


def _last_step(token: int, text: str, decoder, stops: StopMatcher, reason: str) -> Step:
    """Release what the decoder and the stop matcher still hold; a stop string found there wins."""
    text += stops.push(decoder.flush())
    if stops.stopped:
        return Step(token, text, "stop_sequence")
    return Step(token, text + stops.flush(), reason)
