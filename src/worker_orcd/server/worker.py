"""The serving state: one model, its scheduler, metrics, status, and the bridge from the scheduler
thread's events to asyncio streams."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch
from starlette.requests import Request as StarletteRequest

from worker_orcd.engine.memory import human_bytes, residency
from worker_orcd.engine.sampler import SamplingParams
from worker_orcd.engine.scheduler import (
    Draining,
    EndEvent,
    ErrorEvent,
    Event,
    QueueFull,
    Request,
    Scheduler,
    TokenEvent,
)
from worker_orcd.server.errors import APIError
from worker_orcd.server.metrics import Metrics
from worker_orcd.server.schemas import SamplingExtras

log = logging.getLogger("worker_orcd.server")

_WHITESPACE = re.compile(r"\s+")
GREEDY_BELOW = 1e-5  # as vLLM: a smaller temperature is greedy (dividing by it overflows the logits)


MIN_TOP_P = 1e-6  # below float32's range top_p rounds to 0 and filters out every token; this keeps only the top one


def sampling_params(temperature: float, top_p: float, top_k: int, seed: int,
                    extras: SamplingExtras | None = None) -> SamplingParams:
    more = {} if extras is None else dict(
        min_p=extras.min_p or 0.0, repetition_penalty=extras.repetition_penalty or 1.0,
        presence_penalty=extras.presence_penalty or 0.0, frequency_penalty=extras.frequency_penalty or 0.0,
        logit_bias=extras.bias())
    return SamplingParams(temperature=0.0 if temperature < GREEDY_BELOW else temperature,
                          top_p=max(top_p, MIN_TOP_P), top_k=top_k, seed=seed, **more)


def stop_fields(extras: SamplingExtras) -> dict:
    """The Request fields that end a request early or late."""
    return {"stop_token_ids": tuple(extras.stop_token_ids or ()), "ignore_eos": bool(extras.ignore_eos)}


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    worker_id: str = "worker-0"
    callback_url: str | None = None
    ctx: int | None = None  # None: min(model context, 4096)
    max_batch: int = 8
    max_tokens_in: int | None = None  # None: the context
    max_tokens_out: int = 2048
    inference_timeout_sec: float = 300.0
    kv_cache_size_mb: int | None = None
    prefill_chunk: int = 256
    max_waiting: int | None = None  # None: max_batch
    drain_timeout_sec: float = 25.0  # then running streams are cancelled: the process exits within 30 s
    # 2 MiB holds a full 131,072-token context as JSON (text ~0.6 MiB, token ids ~1 MiB) and bounds what each
    # connection buffers and parses; a larger body is refused (413) before it is read
    max_body_bytes: int = 2 * 2**20
    read_timeout_sec: float = 30.0  # for the request head, then again for the body (slow clients: 408)
    cuda_graphs: bool = True  # decode steps replay CUDA graphs on CUDA (--no-cuda-graphs: eager)
    prefix_cache: bool | None = None  # reuse cached prompt prefixes (None: unless WORKER_ORCD_PREFIX_CACHE=0)
    gpu_memory_utilization: float = 0.9  # CUDA: the card's share the worker may fill; the KV pool takes the rest
    served_model_names: list[str] | None = None  # None: the file's stem and the GGUF's general.name
    api_key: str | None = None  # Bearer token for every endpoint but /health and /ready
    allowed_origins: list[str] | None = None  # CORS; None: no CORS headers


def kv_bytes_per_token(net) -> int:
    kv = net.new_kv_cache(1, 1)
    return kv.nbytes // (kv.blocks.n_blocks * kv.block_size)


def plan_kv(kv_per_token: int, model_ctx: int, cfg: ServeConfig) -> tuple[int, int]:
    """(ctx, slots): the context per sequence and how many sequences fit the KV budget."""
    ctx = min(cfg.ctx or min(model_ctx, 4096), model_ctx)
    slots = cfg.max_batch
    if cfg.kv_cache_size_mb is not None:
        fit = cfg.kv_cache_size_mb * 2**20 // (kv_per_token * ctx)
        if fit < 1:
            raise ValueError(f"--kv-cache-size-mb {cfg.kv_cache_size_mb} holds less than one sequence of {ctx} "
                             f"tokens ({kv_per_token * ctx / 2**20:.1f} MiB)")
        slots = min(slots, fit)
    return ctx, slots


def pool_blocks(kv_per_token: int, ctx: int, slots: int, cfg: ServeConfig, device: torch.device,
                workspace: Callable[[], int]) -> int | None:
    """KV blocks of the paged pool on CUDA, sized once the weights are loaded: what `gpu_memory_utilization` of
    the card (and what is free) leaves after the memory already held and one prefill chunk's `workspace()`, never
    fewer than `slots` sequences of `ctx` tokens plus the graphs' scratch slot (the start-up check promised
    those). Blocks beyond that keep more prefixes cached. None (slots x ctx) on CPU or with --kv-cache-size-mb."""
    if device.type != "cuda" or cfg.kv_cache_size_mb is not None:
        return None
    from worker_orcd.engine.kv_cache import GPU_BLOCK_SIZE

    free, total = torch.cuda.mem_get_info(device)
    budget = min(int(total * cfg.gpu_memory_utilization) - torch.cuda.memory_reserved(device), free) - workspace()
    need = (slots + 1) * -(-ctx // GPU_BLOCK_SIZE)
    return max(budget // (kv_per_token * GPU_BLOCK_SIZE), need)


def kv_itemsize(device: torch.device) -> int:
    from worker_orcd.engine.kv_cache import kv_dtype

    return kv_dtype(device).itemsize


def workspace_bytes(path, ctx: int, slots: int, prefill_chunk: int) -> int:
    """engine/memory.py's estimate of the activations and scratch beside the weights and the KV cache."""
    from worker_orcd.engine import memory
    from worker_orcd.gguf import open_gguf

    with open_gguf(path) as f:
        return memory.workspace_bytes(f, ctx, slots, prefill_chunk)


def weight_facts(path) -> tuple[int, str, str | None]:
    """(bytes of all tensors, the ggml type holding most matrix bytes, general.name) from the GGUF file."""
    from worker_orcd.gguf import open_gguf

    by_type: Counter[str] = Counter()
    total = 0
    with open_gguf(path) as f:
        for ref in f.tensors.values():
            total += ref.nbytes
            if len(ref.shape) >= 2:
                by_type[getattr(ref.ggml_type, "name", str(ref.ggml_type))] += ref.nbytes
        name = f.metadata.get("general.name")
    return total, (by_type.most_common(1)[0][0] if by_type else "unknown"), name if isinstance(name, str) else None


def served_names(path, general_name: str | None, configured: list[str] | None) -> list[str]:
    """The names `model` may take in a request; the first is the one responses and /v1/models report."""
    names = configured or [path.name.removesuffix(".gguf"), (general_name or "").strip()[:256]]
    return list(dict.fromkeys(n for n in names if n))


class Worker:
    def __init__(self, model, cfg: ServeConfig):
        self.model = model
        self.tokenizer = model.tokenizer
        self.cfg = cfg
        _, self.quant, general_name = weight_facts(model.path)
        self.served_names = served_names(model.path, general_name, cfg.served_model_names)
        self.model_id = self.served_names[0]
        self.architecture = str(getattr(model.config, "architecture", "unknown"))
        kv_per_token = kv_bytes_per_token(model.net)
        ctx, slots = plan_kv(kv_per_token, model.config.context_length, cfg)
        blocks = pool_blocks(kv_per_token, ctx, slots, cfg, torch.device(model.device),
                             lambda: workspace_bytes(model.path, ctx, slots, cfg.prefill_chunk))
        if blocks is not None:
            from worker_orcd.engine.kv_cache import GPU_BLOCK_SIZE

            positions = blocks * GPU_BLOCK_SIZE
            log.info("KV pool on %s: %d blocks = %d positions (%d sequences of %d), %s, from %.0f%% of the card",
                     model.device, blocks, positions, positions // ctx, ctx, human_bytes(positions * kv_per_token),
                     100 * cfg.gpu_memory_utilization)
        self.scheduler = Scheduler(model.net, model.tokenizer, slots, ctx, cfg.prefill_chunk, cfg.max_waiting,
                                   graphs=False if not cfg.cuda_graphs else None, prefix_cache=cfg.prefix_cache,
                                   kv_blocks=blocks)
        self.ctx = ctx
        self.max_tokens_in = min(cfg.max_tokens_in or ctx - 1, ctx - 1)
        self.max_piece_bytes = max(len(self.tokenizer.piece(i)) for i in range(self.tokenizer.vocab_size))
        # every tensor the model holds is on its device (no silent host fallback), and what they take
        self.vram_resident, weights = residency(model.net, model.device)
        self.vram_bytes = weights + self.scheduler.kv.nbytes
        if model.device.type == "cuda":
            self.vram_bytes = torch.cuda.memory_allocated(model.device)
        self.started = time.monotonic()
        self.created = int(time.time())
        self.ready = False
        self.failed = False
        self.draining = False
        self._mailbox: Mailbox | None = None
        s = self.scheduler
        self.metrics = Metrics(self.vram_bytes, lambda: s.n_running, lambda: s.n_waiting,
                               lambda: s.kv_tokens_used, s.kv_tokens_total, lambda: s.kv_blocks_used,
                               s.kv_blocks_total)

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        if self.draining:
            return "draining"
        if not self.ready:
            return "starting"
        return "ready" if self.scheduler.idle else "busy"

    def start(self) -> None:
        self.scheduler.start()

    def mailbox(self) -> Mailbox:
        """The running event loop's mailbox for scheduler events (made on first use in that loop)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    def check_model(self, name: str | None) -> str:
        """The model name to report back: the one asked for, or the main name when `model` was omitted."""
        if name is None:
            return self.model_id
        if name not in self.served_names and name != self.model.path.name:
            names = ", ".join(repr(n) for n in self.served_names)
            raise APIError(404, "MODEL_NOT_FOUND", f"model: {name[:200]!r} is not served here; this worker serves "
                                                   f"{names}", "model")
        return name

    def check_prompt_bytes(self, text: str, field: str, ignore_whitespace: bool = False) -> None:
        """Refuse, untokenized, a prompt whose bytes alone need more tokens than this worker takes: the
        tokenizer holds the GIL (~1.4 s a MiB on CPU here), stalling every stream while it runs.
        Tokens cover the text's bytes and none is longer than `max_piece_bytes`, so the bound is exact;
        with control tokens parsed (chat) whitespace after one may be stripped, so it is not counted."""
        if ignore_whitespace:
            text = _WHITESPACE.sub("", text)
        n = len(text.encode("utf-8", "surrogatepass"))
        if n > self.max_tokens_in * self.max_piece_bytes:
            raise APIError(413, "PROMPT_TOO_LONG", f"{field} has {n} bytes, so at least {n // self.max_piece_bytes} "
                                                   f"tokens; this worker takes at most {self.max_tokens_in} "
                                                   f"(context {self.ctx})", field)

    async def tokenize(self, text: str, field: str, add_special: bool = True) -> list[int]:
        self.check_prompt_bytes(text, field)
        return await asyncio.to_thread(self.tokenizer.tokenize, text, add_special=add_special)

    def check_lengths(self, n_prompt: int, max_tokens: int, prompt_field: str, max_field: str = "max_tokens") -> int:
        """Validate sizes against the context; returns max_tokens clamped to what the context leaves."""
        if n_prompt == 0:
            raise APIError(400, "INVALID_REQUEST", f"{prompt_field} is empty after tokenization", prompt_field)
        if n_prompt > self.max_tokens_in:
            raise APIError(413, "PROMPT_TOO_LONG", f"{prompt_field} has {n_prompt} tokens; this worker takes at "
                                                   f"most {self.max_tokens_in} (context {self.ctx})", prompt_field)
        limit = min(self.cfg.max_tokens_out, self.ctx)
        if max_tokens > limit:
            raise APIError(400, "INVALID_REQUEST", f"{max_field} {max_tokens} is beyond the limit of {limit} "
                                                   f"(context {self.ctx}, --max-tokens-out "
                                                   f"{self.cfg.max_tokens_out})", max_field)
        return min(max_tokens, self.ctx - n_prompt)

    def submit(self, request_id: str, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
               stop: list[str] | None, kind: str,
               logits_processor: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
               **fields) -> Stream:
        """`fields`: the Request's other fields (logprobs, prompt_logprobs, stop_token_ids, ignore_eos)."""
        if not self.ready or self.draining:
            msg = "the worker is draining" if self.draining else "the worker is not ready yet"
            raise APIError(503, "UNAVAILABLE", msg, retry_after=5)
        req = Request(request_id, prompt_ids, max_tokens, params, stop, self.cfg.inference_timeout_sec,
                      logits_processor, **fields)
        return Stream(self, req, kind)

    def check_extras(self, extras: SamplingExtras) -> None:
        """Token ids in logit_bias and stop_token_ids must be in the vocabulary."""
        self.check_token_ids([t for t, _ in extras.bias()], "logit_bias")
        self.check_token_ids(extras.stop_token_ids or [], "stop_token_ids")

    def check_token_ids(self, ids: list[int], field: str) -> None:
        vocab = self.model.config.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, "INVALID_REQUEST", f"{field}: token id {bad} is outside the vocabulary of {vocab}",
                           field)

    def finished(self, stream: Stream, outcome: str) -> None:
        """Metrics and the one log line of a finished request (never its prompt)."""
        st = stream.stats
        m = self.metrics
        m.requests.labels(outcome=outcome).inc()
        m.tokens_in.inc(st.prompt_tokens)
        m.tokens_out.inc(st.completion_tokens)
        if st.started_at is not None:  # admitted: its prompt was looked up in the prefix cache
            m.prefix_queries.inc(st.prompt_tokens)
            m.prefix_hits.inc(st.cached_tokens)
        m.duration.observe(st.total_ms)
        if st.ttft_ms is not None:
            m.ttft.observe(st.ttft_ms)
        tps = st.completion_tokens / (st.decode_ms / 1000) if st.decode_ms > 0 else 0.0
        ttft = f"{st.ttft_ms:.1f}" if st.ttft_ms is not None else "-"
        log.info("request id=%s kind=%s outcome=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d "
                 "ttft_ms=%s decode_ms=%.1f total_ms=%.1f decode_tok_s=%.1f", stream.request.id, stream.kind,
                 outcome, st.prompt_tokens, st.cached_tokens, st.completion_tokens, ttft, st.decode_ms,
                 st.total_ms, tps)


class Mailbox:
    """Events from the scheduler thread into one event loop, with one wake-up per burst: a step emits a token
    for every running stream, and a call_soon_threadsafe each (a self-pipe write apiece) was most of what
    emitting cost at 64 streams (bench/host_overhead.py)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: deque[tuple[asyncio.Queue, Event]] = deque()
        self._lock = threading.Lock()
        self._woken = False

    def put(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._items.append((queue, event))
            if self._woken:
                return
            self._woken = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._woken = self._items, deque(), False
        for queue, event in items:
            queue.put_nowait(event)


class Stream:
    """Events of one request as an async iterator; leaving it early cancels the request."""

    def __init__(self, worker: Worker, request: Request, kind: str):
        self.worker = worker
        self.request = request
        self.kind = kind
        self.mailbox = worker.mailbox()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            self.handle = worker.scheduler.submit(request, self._put)
        except QueueFull as e:
            raise APIError(429, "BUSY", str(e), retry_after=1) from None
        except Draining as e:
            raise APIError(503, "UNAVAILABLE", str(e), retry_after=5) from None
        except ValueError as e:
            raise APIError(400, "INVALID_REQUEST", str(e)) from None
        self.stats = self.handle.stats
        self.closed = False

    def _put(self, event: Event) -> None:
        self.mailbox.put(self.queue, event)

    async def events(self, client: StarletteRequest | None = None) -> AsyncIterator[Event]:
        """`client`: a non-streaming request to watch, so its going away cancels the job too."""
        outcome = "cancelled"
        last = None
        watcher = asyncio.create_task(self._watch(client)) if client is not None else None
        try:
            while True:
                event = await self.queue.get()
                if isinstance(event, TokenEvent):
                    now = time.monotonic()
                    if last is not None:
                        self.worker.metrics.token_latency.observe((now - last) * 1000)
                    last = now
                elif isinstance(event, EndEvent):
                    outcome = "success"
                elif isinstance(event, ErrorEvent):
                    outcome = {"CANCELLED": "cancelled", "INFERENCE_TIMEOUT": "timeout"}.get(event.code, "error")
                yield event
                if isinstance(event, EndEvent | ErrorEvent):
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close(outcome)

    def close(self, outcome: str = "cancelled") -> None:
        """Cancel the job if it still runs (the client went away: its slot frees within one step) and record
        how it ended, once. Runs however the response ends, even if its events were never read."""
        if not self.handle.done:
            self.worker.scheduler.cancel(self.request.id)
        if not self.closed:
            self.closed = True
            self.worker.finished(self, outcome)

    async def _watch(self, client: StarletteRequest) -> None:
        while not self.handle.done:
            if await client.is_disconnected():
                self.worker.scheduler.cancel(self.request.id)
                return
            await asyncio.sleep(0.25)


async def drain(worker: Worker, exit_server, timeout_s: float) -> None:
    """Stop admitting, let running streams finish (up to timeout_s), cancel the rest, then exit."""
    worker.draining = True
    worker.scheduler.drain()
    deadline = time.monotonic() + timeout_s
    while not worker.scheduler.idle and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not worker.scheduler.idle:
        log.warning("drain timeout after %.0f s: cancelling %d running sequences", timeout_s,
                    worker.scheduler.n_running + worker.scheduler.n_waiting)
        await asyncio.to_thread(worker.scheduler.stop)
        await asyncio.sleep(0.1)  # let the streams send their CANCELLED events
    exit_server()
