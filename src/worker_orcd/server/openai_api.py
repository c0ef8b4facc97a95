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

from worker_orcd.engine.sampler import SamplingParams
from worker_orcd.engine.scheduler import EndEvent, ErrorEvent, TokenEvent
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
from worker_orcd.server.worker import Stream, Worker, sampling_params

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


def _params(body: SamplingFields) -> SamplingParams:
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    return sampling_params(body.temperature, body.top_p, body.top_k, seed)


def _stops(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop


def _usage(stream: Stream) -> dict:
    st = stream.stats
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
            "total_tokens": st.prompt_tokens + st.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": st.cached_tokens}}


def _error_chunk(ev: ErrorEvent) -> dict:
    """An error after the stream began, in the shape of the API's error bodies."""
    return openai_error(HTTP_STATUS.get(ev.code, 500), ev.code, ev.message)[1]


def _raise_for(ev: ErrorEvent) -> None:
    raise APIError(HTTP_STATUS.get(ev.code, 500), ev.code, ev.message)


# -- completions -----------------------------------------------------------------------------------

@router.post("/v1/completions", response_model=CompletionResponse, responses=_json_or_sse(CompletionResponse))
async def completions(body: CompletionRequest, request: Request):
    w = _worker(request)
    model = w.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        vocab = w.model.config.vocab_size
        if any(t >= vocab for t in prompt):
            raise APIError(400, "INVALID_REQUEST", f"prompt: token ids must be below the vocabulary size {vocab}",
                           "prompt")
        ids = list(prompt)
    else:
        ids = await w.tokenize(prompt, "prompt")
    max_tokens = w.check_lengths(len(ids), body.max_tokens or 16, "prompt")
    constraint = None if body.structured_outputs is None else await _constraint(
        w, len(ids), "structured_outputs", structured.output_grammar, None, body.structured_outputs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    stream = w.submit(rid, ids, max_tokens, _params(body), _stops(body.stop), "completion", constraint)
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return sse.EventStream(_completion_chunks(stream, head, usage), stream.close)
    text, reason = [], None
    async with aclosing(stream.events(request)) as events:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
            elif isinstance(ev, EndEvent):
                reason = FINISH[ev.finish_reason]
            else:
                _raise_for(ev)
    choice = {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": None}
    return JSONResponse({**head, "choices": [choice], "usage": _usage(stream)})


async def _completion_chunks(stream: Stream, head: dict, include_usage: bool) -> AsyncIterator[str]:
    async for ev in stream.events():
        if isinstance(ev, TokenEvent):
            if ev.text:
                yield sse.data({**head, "choices": [{"index": 0, "text": ev.text, "finish_reason": None,
                                                     "logprobs": None}]})
        elif isinstance(ev, EndEvent):
            yield sse.data({**head, "choices": [{"index": 0, "text": "", "finish_reason": FINISH[ev.finish_reason],
                                                 "logprobs": None}]})
        else:
            yield sse.data(_error_chunk(ev))
    if include_usage:
        yield sse.data({**head, "choices": [], "usage": _usage(stream)})
    yield sse.data("[DONE]")


# -- chat completions ------------------------------------------------------------------------------

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
    constraint = None
    if plan.forced:
        constraint = await _constraint(w, len(ids), "tools", structured.tool_call_grammar, plan.fmt, plan.tools,
                                       plan.forced_name)
    elif constrained:
        param = "structured_outputs" if body.structured_outputs is not None else "response_format"
        constraint = await _constraint(w, len(ids), param, structured.output_grammar, body.response_format,
                                       body.structured_outputs)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stream = w.submit(rid, ids, max_tokens, _params(body), _stops(body.stop), "chat", constraint)
    head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model}
    out = ChatOutput(w, plan)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        head["object"] = "chat.completion.chunk"
        return sse.EventStream(_chat_chunks(stream, out, head, usage), stream.close)
    reason = None
    async with aclosing(stream.events(request)) as events:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                out.push(ev.text)
            elif isinstance(ev, EndEvent):
                out.finish()
                reason = _chat_finish(ev, out)
            else:
                _raise_for(ev)
    reasoning, content, calls = out.result()
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return JSONResponse({**head, "choices": [{"index": 0, "message": message, "finish_reason": reason}],
                         "usage": _usage(stream)})


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


async def _chat_chunks(stream: Stream, out: ChatOutput, head: dict, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse.data({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    async for ev in stream.events():
        if isinstance(ev, TokenEvent | EndEvent):
            delta = out.push(ev.text) if isinstance(ev, TokenEvent) else out.finish()
            if delta.reasoning:
                yield chunk({"reasoning_content": delta.reasoning})
            if delta.content:
                yield chunk({"content": delta.content})
            if delta.tool_calls:
                yield chunk({"tool_calls": delta.tool_calls})
        if isinstance(ev, EndEvent):
            yield chunk({}, _chat_finish(ev, out))
        elif isinstance(ev, ErrorEvent):
            yield sse.data(_error_chunk(ev))
    if include_usage:
        yield sse.data({**head, "choices": [], "usage": _usage(stream)})
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
    vocab = w.model.config.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise APIError(400, "INVALID_REQUEST", f"tokens: id {bad} is outside the vocabulary of {vocab}", "tokens")
    return DetokenizeResponse(prompt=w.tokenizer.detokenize(body.tokens))
