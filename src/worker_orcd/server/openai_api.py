"""The OpenAI-compatible API: models, completions, chat completions (JSON or SSE), tokenize, detokenize."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from worker_orcd.engine.sampler import Logprob
from worker_orcd.engine.scheduler import EndEvent, ErrorEvent, Event, PromptEvent, TokenEvent
from worker_orcd.server import sse, structured
from worker_orcd.server.chat import ChatOutput, render_chat, tool_plan
from worker_orcd.server.errors import OPENAI_ERROR_RESPONSES, APIError, openai_error
from worker_orcd.server.json_body import StrictJSONRoute
from worker_orcd.server.schemas import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
)
from worker_orcd.server.worker import Stream, Worker, sampling_params, stop_fields

router = APIRouter(tags=["openai"], route_class=StrictJSONRoute)

FINISH = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length"}
HTTP_STATUS = {"CANCELLED": 499, "INFERENCE_TIMEOUT": 504, "VRAM_OOM": 503}  # 500 stays for bugs


def _worker(request: Request) -> Worker:
    return request.app.state.worker


def _json_or_sse(model: type) -> dict:
    return {200: {"model": model, "content": {"text/event-stream": {}}}, **OPENAI_ERROR_RESPONSES}


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    w = _worker(request)
    return ModelList(object="list", data=[ModelCard(id=name, object="model", created=w.created,
                                                    owned_by="worker-orcd", max_model_len=w.ctx)
                                          for name in w.served_names])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses={404: OPENAI_ERROR_RESPONSES[404]})
async def model_card(model: str, request: Request) -> ModelCard:
    w = _worker(request)
    return ModelCard(id=w.check_model(model), object="model", created=w.created, owned_by="worker-orcd",
                     max_model_len=w.ctx)


def _seeds(body: SamplingFields) -> list[int]:
    """Each choice's seed: seed + i for choice i (vLLM's rule: choice 0 is the request with n=1, choice i the
    request with seed + i), wrapped into torch's seed range; a random base when no seed is given."""
    base = body.seed if body.seed is not None else secrets.randbits(63)
    return [s - 2**64 if s >= 2**64 else s for s in (base + i for i in range(body.n or 1))]


def _stops(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop


def _submit(w: Worker, rid: str, ids: list[int], max_tokens: int, body: SamplingFields, kind: str,
            constraints: list[structured.GrammarConstraint | None], **fields) -> list[Stream]:
    """One request per choice (n), decoded together by the scheduler; all or none are admitted."""
    n = body.n or 1
    if n > w.scheduler.max_batch:
        raise APIError(400, "INVALID_REQUEST", f"n: {n} choices are more than this worker decodes at once "
                                               f"({w.scheduler.max_batch}, --max-batch)", "n")
    w.check_extras(body)
    streams: list[Stream] = []
    try:
        for i, seed in enumerate(_seeds(body)):
            params = sampling_params(body.temperature, body.top_p, body.top_k, seed, body)
            streams.append(w.submit(f"{rid}-{i}" if n > 1 else rid, ids, max_tokens, params, _stops(body.stop),
                                    kind, constraints[i], **stop_fields(body), **fields))
    except APIError:
        for stream in streams:
            stream.close()
        raise
    return streams


async def _merged(streams: list[Stream], client: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) from every choice's stream as they come; leaving early cancels them all."""
    if len(streams) == 1:
        async with aclosing(streams[0].events(client)) as events:
            async for ev in events:
                yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        async with aclosing(stream.events(client)) as events:
            async for ev in events:
                queue.put_nowait((i, ev))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            i, ev = await queue.get()
            ended += isinstance(ev, EndEvent | ErrorEvent)
            yield i, ev
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


def _usage(streams: list[Stream], dropped: int = 0) -> dict:
    """The prompt counts once (as OpenAI counts it for n > 1); `dropped`: generated tokens not returned."""
    prompt = streams[0].stats.prompt_tokens
    completion = sum(s.stats.completion_tokens for s in streams) - dropped
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": streams[0].stats.cached_tokens}}


def _error_chunk(ev: ErrorEvent) -> dict:
    """An error after the stream began, in the shape of the API's error bodies."""
    return openai_error(HTTP_STATUS.get(ev.code, 500), ev.code, ev.message)[1]


def _raise_for(ev: ErrorEvent) -> None:
    raise APIError(HTTP_STATUS.get(ev.code, 500), ev.code, ev.message)


def _token_text(w: Worker, token: int) -> str:
    return w.tokenizer.piece(token).decode("utf-8", "replace")


# -- completions -----------------------------------------------------------------------------------

class _CompletionLogprobs:
    """OpenAI's completions logprobs (tokens, token_logprobs, top_logprobs, text_offset) built token by token;
    a top_logprobs entry holds the k most likely tokens and the chosen one (as vLLM returns them)."""

    def __init__(self, w: Worker):
        self.w, self.offset = w, 0
        self.clear()

    def clear(self) -> None:
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, token: int, entry: Logprob | None) -> None:
        text = _token_text(self.w, token)
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        if entry is None:  # the prompt's first token: nothing predicts it
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        self.token_logprobs.append(entry.logprob)
        top = {_token_text(self.w, t): lp for t, lp in entry.top}
        top.setdefault(text, entry.logprob)
        self.top_logprobs.append(top)

    def take(self) -> dict:
        """What was added since the last take (streaming sends each chunk's tokens)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.clear()
        return out


@router.post("/v1/completions", response_model=CompletionResponse, responses=_json_or_sse(CompletionResponse))
async def completions(body: CompletionRequest, request: Request):
    w = _worker(request)
    model = w.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        w.check_token_ids(prompt, "prompt")
        ids = list(prompt)
    else:
        ids = await w.tokenize(prompt, "prompt")
    # echo with max_tokens 0 (the prompt's logprobs alone): one token is generated and dropped, as vLLM does
    only_prompt = body.max_tokens == 0
    max_tokens = w.check_lengths(len(ids), 1 if only_prompt else body.max_tokens or 16, "prompt")
    constraints = [None if body.structured_outputs is None else await _constraint(
        w, len(ids), "structured_outputs", structured.output_grammar, None, body.structured_outputs)
        for _ in range(body.n or 1)]
    rid = f"cmpl-{uuid.uuid4().hex}"
    k = body.logprobs
    streams = _submit(w, rid, ids, max_tokens, body, "completion", constraints, logprobs=k,
                      prompt_logprobs=k if body.echo else None)
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    echo = (prompt if isinstance(prompt, str) else w.tokenizer.detokenize(ids)) if body.echo else None
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return sse.EventStream(_completion_chunks(w, streams, head, usage, echo, ids, k, only_prompt),
                               lambda: [s.close() for s in streams])
    n = len(streams)
    texts, reasons = [[echo or ""] for _ in range(n)], [None] * n
    logprobs = [_CompletionLogprobs(w) for _ in range(n)]
    async for i, ev in _merged(streams, request):
        if isinstance(ev, PromptEvent):
            for token, entry in zip(ids, ev.logprobs):
                logprobs[i].add(token, entry)
        elif isinstance(ev, TokenEvent):
            if not only_prompt:
                texts[i].append(ev.text)
                if k is not None:
                    logprobs[i].add(ev.token, ev.logprob)
        elif isinstance(ev, EndEvent):
            reasons[i] = FINISH[ev.finish_reason]
        else:
            _raise_for(ev)
    choices = [{"index": i, "text": "".join(texts[i]), "finish_reason": reasons[i],
                "logprobs": None if k is None else logprobs[i].take()} for i in range(n)]
    return JSONResponse({**head, "choices": choices, "usage": _usage(streams, n if only_prompt else 0)})


async def _completion_chunks(w: Worker, streams: list[Stream], head: dict, include_usage: bool, echo: str | None,
                             ids: list[int], k: int | None, only_prompt: bool) -> AsyncIterator[str]:
    logprobs = [_CompletionLogprobs(w) for _ in streams]

    def chunk(i: int, text: str, finish: str | None = None) -> str:
        return sse.data({**head, "choices": [{"index": i, "text": text, "finish_reason": finish,
                                              "logprobs": None if k is None else logprobs[i].take()}]})

    if echo is not None and k is None:
        for i in range(len(streams)):
            yield chunk(i, echo)
    async for i, ev in _merged(streams):
        if isinstance(ev, PromptEvent):
            for token, entry in zip(ids, ev.logprobs):
                logprobs[i].add(token, entry)
            yield chunk(i, echo or "")
        elif isinstance(ev, TokenEvent):
            if only_prompt:
                continue
            if k is not None:
                logprobs[i].add(ev.token, ev.logprob)
            if ev.text:
                yield chunk(i, ev.text)
        elif isinstance(ev, EndEvent):
            yield chunk(i, "", FINISH[ev.finish_reason])
        else:
            yield sse.data(_error_chunk(ev))
    if include_usage:
        yield sse.data({**head, "choices": [], "usage": _usage(streams, len(streams) if only_prompt else 0)})
    yield sse.data("[DONE]")


# -- chat completions ------------------------------------------------------------------------------

def _chat_logprob(w: Worker, entry: Logprob) -> dict:
    def one(token: int, logprob: float) -> dict:
        return {"token": _token_text(w, token), "logprob": logprob, "bytes": list(w.tokenizer.piece(token))}

    return {**one(entry.token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}


@router.post("/v1/chat/completions", response_model=ChatResponse, responses=_json_or_sse(ChatResponse))
async def chat_completions(body: ChatRequest, request: Request):
    w = _worker(request)
    model = w.check_model(body.model)
    constrained = structured.schema_of(body.response_format) is not None or body.structured_outputs is not None
    plan = tool_plan(w, body.tools, body.tool_choice, body.parallel_tool_calls, json_output=constrained)
    ids = await asyncio.to_thread(render_chat, w, body.messages, body.reasoning_effort, plan)
    asked = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = w.check_lengths(len(ids), asked or min(w.cfg.max_tokens_out, w.ctx), "messages", field)
    constraints: list[structured.GrammarConstraint | None] = []
    for _ in range(body.n or 1):
        constraint = None
        if plan.forced:
            constraint = await _constraint(w, len(ids), "tools", structured.tool_call_grammar, plan.fmt, plan.tools,
                                           plan.forced_name)
        elif constrained:
            param = "structured_outputs" if body.structured_outputs is not None else "response_format"
            constraint = await _constraint(w, len(ids), param, structured.output_grammar, body.response_format,
                                           body.structured_outputs)
        constraints.append(constraint)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    k = (body.top_logprobs or 0) if body.logprobs else None
    streams = _submit(w, rid, ids, max_tokens, body, "chat", constraints, logprobs=k)
    head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model}
    outs = [ChatOutput(w, plan) for _ in streams]
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        head["object"] = "chat.completion.chunk"
        return sse.EventStream(_chat_chunks(w, streams, outs, head, usage, k is not None),
                               lambda: [s.close() for s in streams])
    reasons: list[str | None] = [None] * len(streams)
    logprobs: list[list[dict]] = [[] for _ in streams]
    async for i, ev in _merged(streams, request):
        if isinstance(ev, TokenEvent):
            outs[i].push(ev.text)
            if ev.logprob is not None:
                logprobs[i].append(_chat_logprob(w, ev.logprob))
        elif isinstance(ev, EndEvent):
            outs[i].finish()
            reasons[i] = _chat_finish(ev, outs[i])
        elif isinstance(ev, ErrorEvent):
            _raise_for(ev)
    choices = []
    for i, out in enumerate(outs):
        reasoning, content, calls = out.result()
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": i, "message": message, "finish_reason": reasons[i],
                        "logprobs": None if k is None else {"content": logprobs[i], "refusal": None}})
    return JSONResponse({**head, "choices": choices, "usage": _usage(streams)})


async def _constraint(w: Worker, n_prompt: int, param: str, make_grammar: Callable[..., object],
                      *args: object) -> structured.GrammarConstraint:
    """The request's grammar constraint, built off the event loop (parsing and compiling may take tens of
    ms); 400 naming `param` when the schema, regex or grammar cannot be used."""
    def build() -> structured.GrammarConstraint:
        return structured.GrammarConstraint(w.tokenizer, n_prompt, grammar=make_grammar(*args))

    try:
        return await asyncio.to_thread(build)
    except structured.GrammarError as e:
        raise APIError(400, "INVALID_REQUEST", f"{param}: cannot be used as a grammar: {str(e)[:300]}",
                       param) from None


def _chat_finish(ev: EndEvent, out: ChatOutput) -> str:
    """A turn that made a call ends with `tool_calls` (unless it ran out of tokens mid-reply)."""
    return "tool_calls" if out.calls and ev.finish_reason != "max_tokens" else FINISH[ev.finish_reason]


async def _chat_chunks(w: Worker, streams: list[Stream], outs: list[ChatOutput], head: dict, include_usage: bool,
                       with_logprobs: bool) -> AsyncIterator[str]:
    pending: list[list[dict]] = [[] for _ in streams]  # logprobs of tokens whose text has not gone out yet

    def chunk(i: int, delta: dict, finish: str | None = None) -> str:
        choice = {"index": i, "delta": delta, "finish_reason": finish}
        if with_logprobs:
            choice["logprobs"] = {"content": pending[i], "refusal": None} if pending[i] else None
            pending[i] = []
        return sse.data({**head, "choices": [choice]})

    for i in range(len(streams)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, ev in _merged(streams):
        if isinstance(ev, TokenEvent) and ev.logprob is not None:
            pending[i].append(_chat_logprob(w, ev.logprob))
        if isinstance(ev, TokenEvent | EndEvent):
            delta = outs[i].push(ev.text) if isinstance(ev, TokenEvent) else outs[i].finish()
            if delta.reasoning:
                yield chunk(i, {"reasoning_content": delta.reasoning})
            if delta.content:
                yield chunk(i, {"content": delta.content})
            if delta.tool_calls:
                yield chunk(i, {"tool_calls": delta.tool_calls})
        if isinstance(ev, EndEvent):
            yield chunk(i, {}, _chat_finish(ev, outs[i]))
        elif isinstance(ev, ErrorEvent):
            yield sse.data(_error_chunk(ev))
    if include_usage:
        yield sse.data({**head, "choices": [], "usage": _usage(streams)})
    yield sse.data("[DONE]")


# -- tokenize / detokenize -------------------------------------------------------------------------

@router.post("/tokenize", response_model=TokenizeResponse, responses=OPENAI_ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    w = _worker(request)
    w.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "INVALID_REQUEST", "give exactly one of prompt or messages", "prompt")
    if body.messages is not None:
        plan = tool_plan(w, body.tools, None, None)
        ids = await asyncio.to_thread(render_chat, w, body.messages, None, plan)
    else:
        ids = await w.tokenize(body.prompt, "prompt", add_special=body.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=w.ctx)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=OPENAI_ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    w = _worker(request)
    w.check_model(body.model)
    w.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=w.tokenizer.detokenize(body.tokens))
