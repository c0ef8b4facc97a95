"""Continuous batching: one thread owns the model and a paged KV pool shared by up to `max_batch` sequences.

Each loop iteration: admit waiting requests while slots and KV blocks last, drop cancelled and timed-out
ones, run ONE decode forward over every decoding sequence (one row each, so each weight is read once per
step) and prefill one chunk of a waiting prompt (on CUDA, chunks of several short prompts in one forward).
Requests join and leave between steps. A forward that raises (a CUDA OOM, a bug) is rerun one sequence at a
time; only the sequences that fail alone end.

Batching must not change results (WORK-3062). Attention is per sequence; what could differ is the matmuls.
On CPU, rows of torch's packed kernels are bitwise independent of each other up to 16 rows, so a prompt
chunk joins the decode forward only while the rows stay within `mix_rows` (16). On CUDA every kernel has
one shape per matrix whatever the row count up to 128 rows (fixed tiles, split-K by shape): decode steps run
through a CUDA graph per batch size, and so do packed prompt chunks of up to 128 rows, each prompt token a row
of the decode step at its own position (riding along with the decode rows when they fit); a longer chunk (other
kernels) runs alone, eagerly. A request is admitted once the pool can hold its prompt plus max_tokens (capped at
the context): no sequence ever waits for a block mid-stream.

Prefix caching (engine/block_manager.py): an admitted prompt starts from the longest run of whole pages whose
KV is cached (a finished or running sequence computed them) and prefills only the rest. It must not change
the result either, so every prompt row meets the same kernels whether its prefix was cached or not: chunks
end on multiples of prefill_chunk, no chunk is "small" (CPU: <= 16 rows, torch's packed kernels; CUDA: one
row, a decode tile) unless the whole prompt is, a run stops short of the prompt's last small_chunk + 1
tokens; CPU prompt attention does not depend on where a chunk ends (kernels/attention.py, blocked_attention).
On CUDA a chunk of more than pack_rows rows meets kernels whose rows depend on the whole chunk (cuBLAS, the
grouped MoE), so its pages are reused only by a prompt whose own prefill computes that same chunk (page tags,
engine/block_manager.py), and a run never stops inside one of the prompt's long chunks.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from worker_orcd.engine.block_manager import chunk_tag
from worker_orcd.engine.cuda_graphs import BucketedDecoder
from worker_orcd.engine.kv_cache import KVCache, SeqSpan
from worker_orcd.engine.sampler import Logprob, Sampler, SamplingParams, logprob_entries, pick_rows, token_logprobs
from worker_orcd.engine.stop import StopMatcher
from worker_orcd.engine.transfer import to_device
from worker_orcd.quant.cpu_matmul import PACKED_MAX_ROWS

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    token: int
    text: str  # UTF-8-complete text released by this token (may be empty)
    index: int  # 0-based index of the generated token
    logprob: Logprob | None = None  # when the request asked for logprobs


@dataclass
class PromptEvent:
    """The prompt's logprobs (Request.prompt_logprobs), sent once its prefill is done, before any token."""
    logprobs: list[Logprob | None]  # one per prompt token; None for the first (nothing predicts it)


@dataclass
class EndEvent:
    finish_reason: str  # "eos" | "stop_sequence" | "max_tokens"
    stats: RequestStats


@dataclass
class ErrorEvent:
    code: str  # "CANCELLED" | "INFERENCE_TIMEOUT" | "VRAM_OOM" | "CUDA_ERROR" | "INTERNAL"
    message: str
    stats: RequestStats


Event = TokenEvent | PromptEvent | EndEvent | ErrorEvent


@dataclass
class RequestStats:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    queued_at: float = 0.0  # time.monotonic() of submit
    started_at: float | None = None  # first prefill chunk
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.queued_at) * 1000

    @property
    def decode_ms(self) -> float:
        if self.first_token_at is None or self.finished_at is None:
            return 0.0
        return (self.finished_at - self.first_token_at) * 1000

    @property
    def total_ms(self) -> float:
        return ((self.finished_at or time.monotonic()) - self.queued_at) * 1000


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] | None = None
    timeout_s: float = 300.0
    # (logits [vocab], ids so far) -> logits, applied before sampling: a grammar's mask (structured output)
    logits_processor: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None
    logprobs: int | None = None  # each token's logprob and this many most likely tokens' (None: no logprobs)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (a PromptEvent); its chunks compute
    # logits for every row, so such a prompt must prefill all of its tokens (no cached prefix)
    stop_token_ids: tuple[int, ...] = ()  # ids that end the request as end-of-generation does
    ignore_eos: bool = False  # end-of-generation ids do not end it (they add no text)


class QueueFull(Exception):
    """Every slot is busy and the wait queue is full: try again later (HTTP 429)."""


class Draining(Exception):
    """The scheduler is shutting down and admits nothing new (HTTP 503)."""


class Handle:
    """The consumer's side of a request: events arrive through `on_event`, or by iterating."""

    def __init__(self, request: Request, on_event: Callable[[Event], None] | None = None):
        self.request = request
        self.stats = RequestStats(prompt_tokens=len(request.prompt_ids), queued_at=time.monotonic())
        self._queue: queue.SimpleQueue[Event] | None = None
        if on_event is None:
            self._queue = queue.SimpleQueue()
            on_event = self._queue.put
        self._emit = on_event
        self.done = False

    def emit(self, event: Event) -> None:
        if isinstance(event, EndEvent | ErrorEvent):
            self.done = True
        self._emit(event)

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise TypeError("this handle delivers events through its on_event callback")
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, EndEvent | ErrorEvent):
                return


class _Seq:
    """A request holding a KV slot: its prompt progress, sampler, decoder and stop matcher."""

    def __init__(self, handle: Handle, slot: int, tokenizer, blocks: int):
        req = handle.request
        self.handle = handle
        self.slot = slot
        self.blocks = blocks  # KV blocks reserved for the whole request
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.history = list(req.prompt_ids)
        self.sampler = Sampler(req.params, req.prompt_ids)
        self.prompt_logprobs: list[Logprob | None] = [None]
        self.decoder = tokenizer.stream_decoder(continuation=True)  # generated text keeps a leading space
        self.stops = StopMatcher(req.stop)
        self.deadline = handle.stats.queued_at + req.timeout_s

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.handle.request.prompt_ids)

    @property
    def kv_len(self) -> int:
        """Tokens in the KV cache: while decoding, all but the last sampled token."""
        return len(self.history) - 1 if self.decoding else self.prefilled


class _InFlight:
    """A decode step launched and not yet landed: its sequences, picks on the device, and their copy to the host
    (pinned memory, an event marking it done) on CUDA."""

    def __init__(self, seqs: list[_Seq], picks: torch.Tensor, asked: list[int],
                 logprobs: tuple[torch.Tensor, ...] | None):
        self.seqs, self.picks, self.asked, self.logprobs = seqs, picks, asked, logprobs
        self.row = {id(s): i for i, s in enumerate(seqs)}
        self._host, self._done = picks, None
        if picks.is_cuda:
            self._host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
            self._host.copy_(picks, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()

    def has(self, seq: _Seq) -> bool:
        return id(seq) in self.row

    def host_picks(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


class Scheduler:
    def __init__(self, net, tokenizer, max_batch: int = 8, ctx: int = 2048, prefill_chunk: int = 256,
                 max_waiting: int | None = None, kv_dtype: torch.dtype | None = None, mix_rows: int | None = None,
                 graphs: bool | None = None, kv_blocks: int | None = None, prefix_cache: bool | None = None,
                 overlap: bool | None = None):
        if max_batch < 1 or ctx < 2 or prefill_chunk < 1:
            raise ValueError(f"need max_batch >= 1, ctx >= 2, prefill_chunk >= 1; got {max_batch}, {ctx}, "
                             f"{prefill_chunk}")
        self.net = net
        self.tokenizer = tokenizer
        self.eog = set(tokenizer.eog_ids)
        self.max_batch = max_batch
        self.ctx = ctx
        self.prefill_chunk = prefill_chunk
        on_cuda = torch.device(getattr(net, "device", "cpu")).type == "cuda"
        # a prefill chunk joins the decode forward while the rows stay within this (never on CUDA: see above)
        self.mix_rows = mix_rows if mix_rows is not None else (0 if on_cuda else 16)
        # prompt chunks packed into one prefill forward while their rows stay within this (CUDA: the kernels'
        # decode-sized row count, where every matmul row is computed on its own; CPU: one prompt per forward)
        self.pack_rows = 128 if on_cuda else 0
        # a prompt chunk of at most this many rows takes other kernels than a longer one (see above)
        self.small_chunk = 1 if on_cuda else PACKED_MAX_ROWS
        self.max_waiting = max_batch if max_waiting is None else max_waiting
        # CUDA graphs for decode-only steps (on by default on CUDA; WORKER_ORCD_CUDA_GRAPHS=0 or
        # --no-cuda-graphs turns them off); one scratch slot takes the rows that pad a batch bucket
        self.graphs = graphs if graphs is not None else (
            on_cuda and hasattr(net, "decode") and os.environ.get("WORKER_ORCD_CUDA_GRAPHS", "1") != "0")
        n_slots = max_batch + int(self.graphs)
        self.kv: KVCache = net.new_kv_cache(ctx, n_slots, dtype=kv_dtype, n_blocks=kv_blocks)
        # on by default; WORKER_ORCD_PREFIX_CACHE=0 or --no-prefix-cache turns it off
        self.kv.blocks.caching = prefix_cache if prefix_cache is not None else (
            os.environ.get("WORKER_ORCD_PREFIX_CACHE", "1") != "0")
        self._reserved = self.kv.blocks.blocks_for(1) if self.graphs else 0  # the scratch slot's one block
        if self.graphs:
            self.kv.prepare(max_batch, 1)
        # packed prompt chunks (up to pack_rows rows) run as rows of the graphed decode step, each prompt token a
        # row at its own position: its K and V are written before any row's attention reads them, and a row sees
        # positions up to its own. One graph replay instead of an eager forward (20-35 ms of Python on an H200,
        # where a burst of requests waited for them); WORKER_ORCD_GRAPHED_PROMPTS=0 runs them eagerly
        self.graph_prompts = self.graphs and self.pack_rows > 0 and (
            os.environ.get("WORKER_ORCD_GRAPHED_PROMPTS", "1") != "0")
        rows = max(max_batch, self.pack_rows) if self.graph_prompts else max_batch
        self._decoder = BucketedDecoder(net, self.kv, max_batch, capture=on_cuda, max_batch=rows) \
            if self.graphs else None
        # decode step N + 1 is launched before step N's tokens are handled on the host (on by default with
        # CUDA graphs; WORKER_ORCD_OVERLAP=0 turns it off): the GPU computes while the host makes text and events
        self.overlap = self._decoder is not None and (overlap if overlap is not None else (
            on_cuda and os.environ.get("WORKER_ORCD_OVERLAP", "1") != "0"))
        self._inflight: _InFlight | None = None
        self._free = list(range(max_batch - 1, -1, -1))  # pop() hands out slot 0 first
        self._running: list[_Seq] = []
        self._waiting: deque[Handle] = deque()
        self._cancelled: set[str] = set()
        self._ids: set[str] = set()  # ids waiting or running
        self._cv = threading.Condition()
        self._draining = False
        self._stopped = False
        self._threads = torch.get_num_threads()  # read here: torch's count is per calling thread
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.steps = 0

    # -- the consumer's API (any thread) --------------------------------------------------------

    def start(self) -> Scheduler:
        if self._decoder is not None and self._decoder.capture:
            self._decoder.warm_up()  # every batch size's graph, before the first request
            self._warm_prompts()
        self._thread.start()
        return self

    def _warm_prompts(self) -> None:
        """Prompt chunks of both kinds (packable, and longer than pack_rows) through a forward once at start-up,
        in a free slot released after, so the first requests do not compile their kernels (H200: the first
        request after ready took 1.4 s). Decode-only steps are covered by the graphs' capture."""
        slot = self._free[-1]
        for n in sorted({min(rows, self.ctx) for rows in (self.pack_rows // 4 + 1, self.pack_rows + 8)}):
            self.kv.prepare(slot, n)
            try:
                self.net.forward(torch.zeros(n, dtype=torch.long), torch.arange(n), self.kv, [SeqSpan(slot, 0, n)],
                                 to_device([n - 1], self.kv.device, torch.long))
            finally:
                self.kv.release(slot)

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue a request; raises QueueFull, Draining, or ValueError for a request that cannot fit."""
        self._check(request)
        handle = Handle(request, on_event)
        with self._cv:
            if self._draining or self._stopped:
                raise Draining("the worker is draining and admits no new requests")
            if request.id in self._ids:
                raise ValueError(f"job_id {request.id!r} is already running")
            busy = len(self._running) + len(self._waiting)
            if busy >= self.max_batch + self.max_waiting:
                raise QueueFull(f"all {self.max_batch} sequences are busy and {len(self._waiting)} requests wait")
            self._ids.add(request.id)
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Stop a request within one step and free its slot; True if it was waiting or running."""
        with self._cv:
            if request_id not in self._ids:
                return False
            self._cancelled.add(request_id)
            self._cv.notify()
            return True

    def drain(self) -> None:
        """Admit nothing new; what runs or waits finishes."""
        with self._cv:
            self._draining = True

    def stop(self, timeout: float | None = 5.0) -> None:
        """Cancel everything and end the thread."""
        with self._cv:
            self._draining = self._stopped = True
            self._cancelled.update(self._ids)
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def active(self, request_id: str) -> bool:
        """True while the request waits or runs."""
        with self._cv:
            return request_id in self._ids

    @property
    def n_running(self) -> int:
        return len(self._running)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        with self._cv:
            return not self._running and not self._waiting

    @property
    def kv_tokens_used(self) -> int:
        return sum(s.kv_len for s in list(self._running))

    @property
    def kv_tokens_total(self) -> int:
        return self.kv.blocks.n_blocks * self.kv.block_size

    @property
    def kv_blocks_used(self) -> int:
        return self.kv.blocks.n_used

    @property
    def kv_blocks_total(self) -> int:
        return self.kv.blocks.n_blocks

    def _check(self, request: Request) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty after tokenization")
        if n >= self.ctx:
            raise ValueError(f"prompt of {n} tokens does not fit the context of {self.ctx}")
        if self._blocks_needed(request) + self._reserved_floor() > self.kv.blocks.n_blocks:
            raise ValueError(f"prompt of {n} tokens plus max_tokens {request.max_tokens} needs more KV blocks "
                             f"than the pool's {self.kv.blocks.n_blocks}")
        if request.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {request.max_tokens}")
        request.params.validate()

    # -- the scheduler thread -------------------------------------------------------------------

    def _loop(self) -> None:
        # The serving process has two busy threads: this one and the HTTP event loop (tokenizing, streaming).
        # Intra-op threads on every core starve the other; all but one core for the model measured 1.8x
        # faster decode on 2 cores (22 -> 40 tokens/s for one stream, 60 -> 123 for eight).
        torch.set_num_threads(max(1, self._threads - 1))
        while True:
            with self._cv:
                while not (self._running or self._waiting or self._stopped):
                    self._cv.wait()
                if self._stopped and not self._running and not self._waiting:
                    return
                self._admit()
                self._reap()
            try:
                self._step()
            except Exception as e:  # a bug outside the forwards (those fail only their sequences): keep serving
                log.exception("scheduler step failed")
                with self._cv:
                    for seq in list(self._running):
                        self._finish(seq, ErrorEvent(error_code(e), f"{type(e).__name__}: {e}", seq.handle.stats))

    def _blocks_needed(self, request: Request) -> int:
        """Blocks the request can ever hold: its prompt and max_tokens, at most the context."""
        return self.kv.blocks.blocks_for(min(len(request.prompt_ids) + request.max_tokens, self.ctx))

    def _reserved_floor(self) -> int:
        return self.kv.blocks.blocks_for(1) if self.graphs else 0

    def _admit(self) -> None:
        while self._waiting and self._free:
            handle = self._waiting[0]
            need = self._blocks_needed(handle.request)
            if self._reserved + need > self.kv.blocks.n_blocks:
                return  # first come, first served: it waits for blocks to come back
            self._waiting.popleft()
            try:
                seq = _Seq(handle, self._free.pop(), self.tokenizer, need)
            except Exception as e:  # a sampler or decoder that cannot be built fails this request only
                self._ids.discard(handle.request.id)
                handle.emit(ErrorEvent("INTERNAL", f"{type(e).__name__}: {e}", handle.stats))
                continue
            self._running.append(seq)
            self._reserved += need
            self._reuse_prefix(seq)

    def _reuse_prefix(self, seq: _Seq) -> None:
        """Start the sequence from the longest cached run of whole pages of its prompt that holds the bits its
        own prefill would compute (page tags), never stopping inside a long chunk. Its reservation stays whole:
        blocks it shares count for it too, so the pool never runs short of what was promised."""
        prompt = seq.handle.request.prompt_ids
        blocks = self.kv.blocks
        tags = self._page_tags(prompt) if blocks.caching else []
        pages = 0
        if seq.handle.request.prompt_logprobs is None:  # else every prompt row's logits are asked for
            pages = min(blocks.cached_pages(prompt, tags), max(0, (len(prompt) - self.small_chunk - 1) // blocks.page))
            for start, end in self._long_chunks(len(prompt)):
                if start < pages * blocks.page < end:  # the rest of a long chunk would meet other kernels
                    pages = start // blocks.page
        seq.prefilled = seq.handle.stats.cached_tokens = self.kv.reuse_prefix(seq.slot, prompt, pages, tags)

    def _long_chunks(self, n: int) -> list[tuple[int, int]]:
        """The chunks [start, end) of an n-token prompt prefilled from its start that are longer than pack_rows
        (CUDA): they run through kernels whose rows depend on the chunk (cuBLAS, grouped GEMMs)."""
        spans, start = [], 0
        while start < n and self.pack_rows:
            end = self._chunk_end(n, start)
            if end - start > self.pack_rows:
                spans.append((start, end))
            start = end
        return spans

    def _page_tags(self, prompt: list[int]) -> list[bytes | None]:
        """The prefix-cache tag of each page of the prompt (engine/block_manager.py): a long chunk's pages carry
        its span and ids (chunks start on page boundaries); the page its end cuts, when that is the prompt's
        end, mixes it with decode rows (None)."""
        page = self.kv.blocks.page
        tags: list[bytes | None] = [b""] * (len(prompt) // page + 1)
        for start, end in self._long_chunks(len(prompt)):
            tag = chunk_tag(start, end, prompt[start:end])
            for i in range(start // page, -(-end // page)):
                tags[i] = tag if (i + 1) * page <= end else None
        return tags

    def _reap(self) -> None:
        """Cancelled and timed-out requests leave now, waiting or running."""
        now = time.monotonic()
        for handle in list(self._waiting):
            code = self._abort_code(handle.request.id, handle.stats.queued_at + handle.request.timeout_s, now)
            if code:
                self._waiting.remove(handle)
                self._ids.discard(handle.request.id)
                self._cancelled.discard(handle.request.id)
                handle.stats.finished_at = now
                handle.emit(ErrorEvent(code, _ABORT_MESSAGES[code], handle.stats))
        for seq in list(self._running):
            code = self._abort_code(seq.handle.request.id, seq.deadline, now)
            if code:
                self._finish(seq, ErrorEvent(code, _ABORT_MESSAGES[code], seq.handle.stats))
        self._cancelled &= self._ids

    def _abort_code(self, request_id: str, deadline: float, now: float) -> str | None:
        if request_id in self._cancelled:
            return "CANCELLED"
        if now > deadline:
            return "INFERENCE_TIMEOUT"
        return None

    def _finish(self, seq: _Seq, event: EndEvent | ErrorEvent) -> None:
        """Free the slot and send the last event (called with the lock held)."""
        if seq in self._running:
            self._running.remove(seq)
            self._free.append(seq.slot)
            self.kv.release(seq.slot)
            self._reserved -= seq.blocks
        self._ids.discard(seq.handle.request.id)
        self._cancelled.discard(seq.handle.request.id)
        seq.handle.stats.finished_at = time.monotonic()
        seq.handle.emit(event)

    def _step(self) -> None:
        decoded = self._overlapped_decode() if self.overlap else False
        decoding = [] if self.overlap else [s for s in self._running if s.decoding]
        prefills = self._prefill_group()
        rows = len(decoding) + sum(self._chunk_len(p) for p in prefills)
        if prefills and decoding and rows <= self.mix_rows:
            self._forward(decoding, prefills)  # short chunks ride along with the decode rows
        else:
            if decoding:
                self._forward(decoding, [])
            if prefills:
                self._forward([], prefills)
        if decoded or decoding or prefills:
            self.steps += 1

    def _overlapped_decode(self) -> bool:
        """Launch this step's decode rows, then land the step still in flight: the host's work on its tokens
        (text, stop strings, events) runs while the GPU computes the new step, whose rows take their tokens
        from the previous picks on the device. A sequence that ends on a landed token wasted its new row (it is
        dropped when that step lands); one that must end there (max_tokens, a full context) gets no row. A
        logits processor needs the tokens on the host: such steps land first and run as before. Prompt chunks ride
        along in the same step while the rows stay within pack_rows (graphed prompts, `_riders`)."""
        last, self._inflight = self._inflight, None
        decoding = [s for s in self._running if s.decoding]
        if any(s.handle.request.logits_processor is not None for s in decoding):
            if last is not None:
                self._land(last)
            decoding = [s for s in self._running if s.decoding]
            if decoding:
                self._forward(decoding, [])
            return bool(decoding)
        rows = [s for s in decoding if not (last is not None and last.has(s) and self._ends_on_next(s))]
        riders = self._riders(len(rows))
        if rows or riders:
            try:
                self._inflight = self._launch(rows, last, riders)
            except Exception as e:  # an OOM, a bug: land what flies, then this step as an ordinary forward
                log.warning("an overlapped decode launch failed (%s: %s); running the step alone", type(e).__name__, e)
                if last is not None:
                    self._land(last)
                    last = None
                rows = [s for s in self._running if s.decoding]
                if rows:
                    self._forward(rows, [])
        if last is not None:
            self._land(last)
        return bool(rows or riders)

    def _ends_on_next(self, seq: _Seq) -> bool:
        """The token in flight is the sequence's last whatever it is (max_tokens or the context reached)."""
        return (seq.handle.stats.completion_tokens + 1 >= seq.handle.request.max_tokens
                or len(seq.history) + 1 >= self.ctx)

    def _riders(self, n_rows: int) -> list[_Seq]:
        """Prompts whose next chunks join a decode step of n_rows rows (graphed prompts): in arrival order while
        all rows stay within pack_rows; not those that want every prompt row's logits or a logits processor."""
        group, rows = [], n_rows
        if not self.graph_prompts:
            return group
        for seq in self._running:
            req = seq.handle.request
            if seq.decoding or req.prompt_logprobs is not None or req.logits_processor is not None:
                continue
            n = self._chunk_len(seq)
            if rows + n > self.pack_rows:
                break
            group.append(seq)
            rows += n
        return group

    def _launch(self, rows: list[_Seq], last: _InFlight | None, riders: list[_Seq] = ()) -> _InFlight:
        """One decode forward and its picks for `rows`, left running on the device. A row whose previous
        token is still in flight reads it from `last`'s picks and sits one position further. Each rider's next
        prompt chunk follows as rows at their own positions; a rider whose prompt that chunk ends picks its first
        token with the decode rows."""
        dev = self.kv.device
        pending = [last is not None and last.has(s) for s in rows]
        positions = [len(s.history) if p else s.kv_len for s, p in zip(rows, pending)]
        if last is not None and all(pending) and len(rows) == len(last.seqs) and all(
                a is b for a, b in zip(rows, last.seqs)):
            tokens = last.picks  # the steady state: the same rows in the same order
        else:
            tokens = to_device([0 if p else s.history[-1] for s, p in zip(rows, pending)], dev, torch.long)
            if any(pending):
                dst = [i for i, p in enumerate(pending) if p]
                src = [last.row[id(rows[i])] for i in dst]
                tokens[to_device(dst, dev, torch.long)] = last.picks[to_device(src, dev, torch.long)]
        slots = [s.slot for s in rows]
        chunks = [(seq, seq.prefilled, seq.prefilled + self._chunk_len(seq)) for seq in riders]
        for seq, start, end in chunks:
            positions += range(start, end)
            slots += [seq.slot] * (end - start)
        if chunks:
            prompt_rows = [t for seq, start, end in chunks for t in seq.handle.request.prompt_ids[start:end]]
            tokens = torch.cat([tokens.reshape(-1), to_device(prompt_rows, dev, torch.long)])
        logits = self._decoder.step(tokens, positions, slots)
        picking, at, r = list(rows), list(range(len(rows))), len(rows)
        for seq, start, end in chunks:  # the chunk's KV is written by the step just queued
            r += end - start
            seq.prefilled = end
            self.kv.blocks.commit(seq.slot, seq.handle.request.prompt_ids[:end])
            if seq.handle.stats.started_at is None:
                seq.handle.stats.started_at = time.monotonic()
            if seq.decoding:
                picking.append(seq)
                at.append(r - 1)
        if not picking:  # only mid-prompt chunks rode along
            return _InFlight([], torch.empty(0, dtype=torch.long, device=dev), [], None)
        if at != list(range(logits.shape[0])):
            logits = logits[to_device(at, dev, torch.long)]
        picks, asked, lp = self._pick_on_device(picking, logits)
        return _InFlight(picking, picks, asked, lp)

    def _land(self, step: _InFlight) -> None:
        """Handle a launched step's tokens on the host (waits for them); sequences that ended meanwhile skip."""
        tokens, logprobs = self._picked(step.seqs, step.host_picks(), step.asked, step.logprobs)
        for seq, token, logprob in zip(step.seqs, tokens, logprobs):
            if seq.handle.done:
                continue
            self.kv.blocks.commit(seq.slot, seq.history)  # the step wrote the KV of its last token
            self._advance_or_fail(seq, token, logprob)

    def _prefill_group(self) -> list[_Seq]:
        """The prompts whose next chunks prefill this step: the first waiting one, and on CUDA more while all
        their chunks together stay within pack_rows (every kernel treats those rows one by one, so packing
        changes no result; a longer chunk runs alone, as it would anyway)."""
        group, rows = [], 0
        for seq in self._running:
            if seq.decoding:
                continue
            n = self._chunk_len(seq)
            if group and rows + n > self.pack_rows:
                break
            group.append(seq)
            rows += n
            if rows > self.pack_rows:
                break
        return group

    def _chunk_len(self, seq: _Seq) -> int:
        return self._chunk_end(len(seq.handle.request.prompt_ids), seq.prefilled) - seq.prefilled

    def _chunk_end(self, n: int, start: int) -> int:
        """Where the chunk of an n-token prompt from `start` ends: the next multiple of prefill_chunk, so a prompt
        splits alike with or without a cached prefix; later where that chunk, or what it leaves, would be small
        (see the module's docstring)."""
        small = self.small_chunk
        end = start - start % self.prefill_chunk + self.prefill_chunk
        while end - start <= small:
            end += self.prefill_chunk
        if n - end <= small:
            end = n
        return min(end, n)

    def _forward(self, decoding: list[_Seq], prefills: list[_Seq]) -> None:
        """One forward over the group; if it fails, find out which sequences fail on their own."""
        try:
            logits = self._logits(decoding, prefills)
        except Exception as e:
            self._isolate(decoding, prefills, e)
            return
        self._apply(decoding, prefills, logits)

    def _isolate(self, decoding: list[_Seq], prefills: list[_Seq], error: Exception) -> None:
        """A batched forward failed (an OOM, a bad input) and the culprit is unknown: run each sequence
        alone once and fail only those that fail alone. Rerunning is safe: a retry rewrites the same KV
        rows before any attention reads them, and a sequence's result does not depend on its batch."""
        groups: list[tuple[list[_Seq], list[_Seq]]] = [([s], []) for s in decoding] + [([], [p]) for p in prefills]
        if len(groups) == 1:
            self._fail([*decoding, *prefills], error)
            return
        log.warning("a forward of %d sequences failed (%s: %s); retrying each alone", len(groups),
                    type(error).__name__, error)
        _release_cached_memory(error)
        for alone, chunk in groups:
            try:
                logits = self._logits(alone, chunk)
            except Exception as e:
                self._fail(alone or chunk, e)
                continue
            self._apply(alone, chunk, logits)

    def _fail(self, seqs: list[_Seq], error: Exception) -> None:
        """End these sequences with the error's code; their KV slots go back to the free list."""
        code = error_code(error)
        for seq in seqs:
            log.error("request %s failed in a forward: %s: %s", seq.handle.request.id, type(error).__name__, error)
        _release_cached_memory(error)
        with self._cv:
            for seq in seqs:
                self._finish(seq, ErrorEvent(code, f"{type(error).__name__}: {error}", seq.handle.stats))

    def _logits(self, decoding: list[_Seq], prefills: list[_Seq]) -> torch.Tensor:
        """One forward: a row per decoding sequence (its last token), then one chunk of each prompt in
        `prefills`; logits for the decode rows and each prompt's last row. Changes nothing but the KV rows
        it writes, so a failed call can be retried."""
        tokens = [s.history[-1] for s in decoding]
        positions = [s.kv_len for s in decoding]
        spans = [SeqSpan(s.slot, i, i + 1) for i, s in enumerate(decoding)]
        rows = list(range(len(decoding)))  # which rows need logits
        if not prefills and self._decoder is not None:
            return self._decoder.step(tokens, positions, [s.slot for s in decoding])
        for seq in prefills:
            prompt = seq.handle.request.prompt_ids
            start, n = seq.prefilled, len(tokens)
            end = start + self._chunk_len(seq)
            if seq.handle.stats.started_at is None:
                seq.handle.stats.started_at = time.monotonic()
            tokens += prompt[start:end]
            positions += range(start, end)
            spans.append(SeqSpan(seq.slot, n, len(tokens)))
            if seq.handle.request.prompt_logprobs is not None:
                rows += range(n, len(tokens))  # every row: each predicts the prompt's next token
            elif end == len(prompt):
                rows.append(len(tokens) - 1)
        if not rows:  # only mid-prompt chunks: the forward still computes one row of logits
            rows.append(len(tokens) - 1)
        if not decoding and self.graph_prompts and len(tokens) <= self.pack_rows:
            slots = [seq.slot for seq in prefills for _ in range(self._chunk_len(seq))]
            logits = self._decoder.step(tokens, positions, slots)  # every row's logits, in the graph's buffer
            return logits[to_device(rows, logits.device, torch.long)]
        return self.net.forward(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                                self.kv, spans, to_device(rows, self.kv.device, torch.long))

    def _apply(self, decoding: list[_Seq], prefills: list[_Seq], logits: torch.Tensor) -> None:
        """Advance the group past a successful forward: the chunks count as prefilled (their prompt logprobs
        kept), then every sequence with a row to sample picks, all in one batch."""
        picking, rows = list(decoding), list(range(len(decoding)))
        r = len(decoding)  # the prompt chunks' rows follow the decode rows, in the order `_logits` put them
        for seq in prefills:
            start, n = seq.prefilled, self._chunk_len(seq)
            seq.prefilled += n
            self.kv.blocks.commit(seq.slot, seq.handle.request.prompt_ids[: seq.prefilled])
            k = seq.handle.request.prompt_logprobs
            if k is not None:
                self._keep_prompt_logprobs(seq, logits[r:r + n], start, k)
                r += n
            elif seq.decoding:
                r += 1
            if seq.decoding:
                picking.append(seq)
                rows.append(r - 1)
                if k is not None:
                    seq.handle.emit(PromptEvent(seq.prompt_logprobs))
        for seq in decoding:  # this step wrote the KV of each one's last token
            self.kv.blocks.commit(seq.slot, seq.history)
        if picking:
            rows_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]
            for seq, (token, logprob) in zip(*self._pick(picking, rows_logits)):
                self._advance_or_fail(seq, token, logprob)

    def _keep_prompt_logprobs(self, seq: _Seq, logits: torch.Tensor, start: int, k: int) -> None:
        """Row j of a chunk starting at `start` predicts prompt token start + j + 1 (the last row of the last
        chunk predicts the first generated token: it is sampled, not kept here)."""
        prompt = seq.handle.request.prompt_ids
        targets = prompt[start + 1:start + 1 + logits.shape[0]]
        if targets:
            ids = to_device(targets, logits.device, torch.long)
            seq.prompt_logprobs += logprob_entries(targets, *token_logprobs(logits[:len(targets)], ids, k),
                                                   [k] * len(targets))

    def _pick(self, seqs: list[_Seq], logits: torch.Tensor) -> tuple[list[_Seq], list[tuple[int, Logprob | None]]]:
        """The next token of each sequence (row i of logits [B, vocab]), all on the logits' device with one
        transfer of the tokens (engine.sampler.pick_rows); a sequence whose logits processor fails ends alone."""
        processed = logits
        for i, seq in enumerate(seqs):
            processor = seq.handle.request.logits_processor
            if processor is None:
                continue
            if processed is logits:
                processed = logits.clone()
            try:
                processed[i] = processor(processed[i], seq.history)
            except Exception as e:
                log.exception("request %s failed in its logits processor", seq.handle.request.id)
                with self._cv:
                    self._finish(seq, ErrorEvent("INTERNAL", f"{type(e).__name__}: {e}", seq.handle.stats))
        live = [i for i, s in enumerate(seqs) if not s.handle.done]
        if len(live) < len(seqs):
            seqs, logits, processed = [seqs[i] for i in live], logits[live], processed[live]
        if not seqs:
            return [], []
        picks, asked, rows = self._pick_on_device(seqs, logits, processed)
        tokens, logprobs = self._picked(seqs, picks.tolist(), asked, rows)
        return seqs, list(zip(tokens, logprobs))

    def _pick_on_device(self, seqs: list[_Seq], logits: torch.Tensor, processed: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, list[int], tuple[torch.Tensor, ...] | None]:
        """Row i's next token (pick_rows on `processed`, default the logits) and, for the rows that asked,
        their logprobs from the raw logits: all on the device, nothing transferred yet."""
        samplers = [s.sampler for s in seqs]
        picks = pick_rows(logits if processed is None else processed, [s.p for s in samplers],
                          [s.draw() for s in samplers], [s.counts_for(logits) for s in samplers])
        asked = [i for i, s in enumerate(seqs) if s.handle.request.logprobs is not None]
        rows = None
        if asked:
            k = max(seqs[i].handle.request.logprobs for i in asked)
            index = to_device(asked, logits.device, torch.long)
            rows = token_logprobs(logits[index], picks[index], k)
        return picks, asked, rows

    def _picked(self, seqs: list[_Seq], tokens: list[int], asked: list[int], rows: tuple[torch.Tensor, ...] | None
                ) -> tuple[list[int], list[Logprob | None]]:
        """The host's tokens and logprob entries of `_pick_on_device`'s results."""
        logprobs: list[Logprob | None] = [None] * len(seqs)
        if asked:
            ks = [seqs[i].handle.request.logprobs for i in asked]
            for i, entry in zip(asked, logprob_entries([tokens[i] for i in asked], *rows, ks)):
                logprobs[i] = entry
        return tokens, logprobs

    def _advance_or_fail(self, seq: _Seq, token: int, logprob: Logprob | None) -> None:
        """A failure while decoding one sequence's token ends that sequence only."""
        try:
            self._advance(seq, token, logprob)
        except Exception as e:
            log.exception("request %s failed while decoding its token", seq.handle.request.id)
            with self._cv:
                self._finish(seq, ErrorEvent("INTERNAL", f"{type(e).__name__}: {e}", seq.handle.stats))

    def _advance(self, seq: _Seq, token: int, logprob: Logprob | None) -> None:
        """Emit the picked token; finish on a stop id (end-of-generation unless ignored, stop_token_ids), a
        stop string, max_tokens or a full context."""
        req, stats = seq.handle.request, seq.handle.stats
        seq.history.append(token)
        index = stats.completion_tokens
        stats.completion_tokens += 1
        if stats.first_token_at is None:
            stats.first_token_at = time.monotonic()
        if token in req.stop_token_ids or (token in self.eog and not req.ignore_eos):
            text, reason = _release(seq, "", "eos")
            self._end(seq, token, index, text, reason, logprob)
            return
        text = seq.stops.push("" if token in self.eog else seq.decoder.push(token))
        if seq.stops.stopped:
            self._end(seq, token, index, text, "stop_sequence", logprob)
        elif stats.completion_tokens >= req.max_tokens or len(seq.history) >= self.ctx:
            text, reason = _release(seq, text, "max_tokens")
            self._end(seq, token, index, text, reason, logprob)
        else:
            seq.handle.emit(TokenEvent(token, text, index, logprob))

    def _end(self, seq: _Seq, token: int, index: int, text: str, reason: str, logprob: Logprob | None) -> None:
        seq.handle.emit(TokenEvent(token, text, index, logprob))
        with self._cv:
            self._finish(seq, EndEvent(reason, seq.handle.stats))


def error_code(error: BaseException) -> str:
    """The worker API's code for an exception raised by a forward."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "VRAM_OOM"
    if isinstance(error, RuntimeError) and "CUDA error" in str(error):
        return "CUDA_ERROR"
    return "INTERNAL"


def _release_cached_memory(error: BaseException) -> None:
    """After an OOM, hand the failed forward's cached blocks back so a retry (or the next step) can use them."""
    if isinstance(error, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _release(seq: _Seq, text: str, reason: str) -> tuple[str, str]:
    """Flush what the decoder and the stop matcher still hold; a stop string found there wins."""
    text += seq.stops.push(seq.decoder.flush())
    if seq.stops.stopped:
        return text, "stop_sequence"
    return text + seq.stops.flush(), reason


_ABORT_MESSAGES = {
    "CANCELLED": "the request was cancelled",
    "INFERENCE_TIMEOUT": "the request ran past its inference timeout",
}
