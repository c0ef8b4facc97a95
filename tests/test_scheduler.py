"""Continuous batching on the real default model: batch invariance, cancel, admission, timeouts, chunked prefill.

The scheduler only needs `eog_ids` and `stream_decoder()` from a tokenizer; a tiny one that spells ids
keeps these tests about scheduling, independent of text.
"""

from __future__ import annotations

import pytest
import torch

from tests.waiting import wait_for
from worker_orcd.engine.sampler import SamplingParams
from worker_orcd.engine.scheduler import EndEvent, ErrorEvent, QueueFull, Request, Scheduler, TokenEvent

EOS = 2


class IdDecoder:
    def push(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


class IdTokenizer:
    eog_ids = [EOS]

    def stream_decoder(self, continuation: bool = False) -> IdDecoder:
        return IdDecoder()


@pytest.fixture(scope="module")
def net(smollm2_path):
    from worker_orcd.gguf import open_gguf
    from worker_orcd.models.registry import build_model

    with open_gguf(smollm2_path) as f:
        return build_model(f, torch.device("cpu"))


@pytest.fixture
def sched(net):
    s = Scheduler(net, IdTokenizer(), max_batch=8, ctx=512, prefill_chunk=64, max_waiting=2).start()
    yield s
    s.stop()


def prompt(i: int, n: int = 12) -> list[int]:
    return [1] + [(1000 + 37 * i + 11 * k) % 40000 + 100 for k in range(n)]


def tokens_of(handle) -> tuple[list[int], EndEvent | ErrorEvent]:
    out, last = [], None
    for ev in handle:
        if isinstance(ev, TokenEvent):
            out.append(ev.token)
        else:
            last = ev
    return out, last


@pytest.fixture
def forward_sizes(net, monkeypatch):
    """How many sequences each forward of `net` served, in order."""
    sizes: list[int] = []
    forward = net.forward

    def counted(tokens, positions, kv, seqs=None, *args, **kwargs):
        sizes.append(len(seqs) if seqs else 1)
        return forward(tokens, positions, kv, seqs, *args, **kwargs)

    monkeypatch.setattr(net, "forward", counted)
    return sizes


def test_greedy_batch_of_8_equals_alone(sched, forward_sizes):
    # short prompts join the decode forward (mixed rows), the longer ones prefill on their own
    reqs = [Request(f"r{i}", prompt(i, 3 + 4 * i), 20) for i in range(8)]
    steps0 = sched.steps
    alone = [tokens_of(sched.submit(r))[0] for r in reqs]
    # a step per token (the prefill gives the first); the counter moves just after a step's last event
    wait_for(lambda: sched.steps - steps0 == sum(len(t) for t in alone), "one step per token alone")
    steps0 = sched.steps
    forward_sizes.clear()
    with sched._cv:  # all 8 queue before the scheduler admits any, however the threads are scheduled
        together = [sched.submit(Request(r.id + "b", r.prompt_ids, r.max_tokens)) for r in reqs]
    assert [tokens_of(h)[0] for h in together] == alone
    steps_together = sched.steps - steps0
    # alone ~160 steps. Together: one prompt prefills per step (the first 8 steps, beside the earlier ones'
    # decode rows), then up to 19 decode steps after the last one.
    assert steps_together <= max(len(t) for t in alone) + 7, f"{steps_together} steps for 8 requests: not shared"
    assert max(forward_sizes) == 8, f"at most {max(forward_sizes)} sequences shared a forward"


def test_every_sampling_option_is_batch_invariant(sched):
    """Penalties, logit bias, min_p, logprobs and prompt logprobs: each request's tokens and logprobs among 7
    others are what it gets alone (its counts and generator are its own; the pick treats rows one by one)."""
    from dataclasses import replace

    from worker_orcd.engine.scheduler import PromptEvent

    kinds = [SamplingParams(temperature=0.9, min_p=0.1, seed=0), SamplingParams(repetition_penalty=1.3),
             SamplingParams(temperature=1.2, presence_penalty=0.5, frequency_penalty=0.5, top_k=40, seed=0),
             SamplingParams(logit_bias=((500, 5.0), (501, -100.0)))]
    reqs = [Request(f"k{i}", prompt(i, 4 + 5 * i), 12, replace(kinds[i % 4], seed=i), logprobs=2 if i % 2 else None,
                    prompt_logprobs=1 if i % 3 == 0 else None) for i in range(8)]

    def events(handle) -> list:
        return [(e.token, e.logprob) if isinstance(e, TokenEvent) else e.logprobs for e in handle
                if isinstance(e, TokenEvent | PromptEvent)]

    alone = [events(sched.submit(r)) for r in reqs]
    together = [events(h) for h in [sched.submit(replace(r, id=r.id + "b")) for r in reqs]]
    assert together == alone
    for i, r in enumerate(reqs):  # the prompt's logprobs first (None for its first token), then each token's
        if r.prompt_logprobs is not None:
            assert len(alone[i][0]) == len(r.prompt_ids) and alone[i][0][0] is None
        assert all((lp is not None) == (i % 2 == 1) for _, lp in alone[i][r.prompt_logprobs is not None:])


def test_sampled_request_is_seeded(sched):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    a = tokens_of(sched.submit(Request("s1", prompt(1), 16, params)))[0]
    others = [sched.submit(Request(f"o{i}", prompt(i), 16, SamplingParams(temperature=1.0, seed=i))) for i in range(3)]
    b = tokens_of(sched.submit(Request("s2", prompt(1), 16, params)))[0]
    for h in others:
        tokens_of(h)
    assert a == b


def test_decode_logits_do_not_depend_on_batch_size(net):
    """The property batch invariance rests on: a row's logits are bitwise the same in any batch."""
    from worker_orcd.engine.kv_cache import SeqSpan

    kv = net.new_kv_cache(64, 8)
    prompts = [prompt(i, 10) for i in range(8)]
    for s, p in enumerate(prompts):
        net.forward(torch.tensor(p), torch.arange(len(p)), kv, [SeqSpan(s, 0, len(p))], torch.tensor([len(p) - 1]))
    rows = torch.tensor([p[-1] for p in prompts])
    positions = torch.tensor([len(p) for p in prompts])
    batch = net.forward(rows, positions, kv, [SeqSpan(s, s, s + 1) for s in range(8)])
    for s in range(8):
        alone = net.forward(rows[s : s + 1], positions[s : s + 1], kv, [SeqSpan(s, 0, 1)])
        assert torch.equal(alone[0], batch[s]), f"row {s} differs alone vs in a batch of 8"


def test_max_tokens_and_eos_finish(sched):
    toks, end = tokens_of(sched.submit(Request("m", prompt(3), 5)))
    assert isinstance(end, EndEvent) and end.finish_reason == "max_tokens" and len(toks) == 5
    assert end.stats.completion_tokens == 5 and end.stats.prompt_tokens == len(prompt(3))


def test_stop_string(sched):
    toks, _ = tokens_of(sched.submit(Request("a", prompt(4), 6)))
    stop = f"<{toks[2]}>"
    texts, end = [], None
    for ev in sched.submit(Request("b", prompt(4), 6, stop=[stop])):
        if isinstance(ev, TokenEvent):
            texts.append(ev.text)
        else:
            end = ev
    assert end.finish_reason == "stop_sequence"
    assert "".join(texts) == "".join(f"<{t}>" for t in toks[: toks.index(toks[2])])


def test_cancel_frees_slot_within_one_step(sched):
    handle = sched.submit(Request("long", prompt(5), 400))
    seen = 0
    for ev in handle:
        if isinstance(ev, TokenEvent):
            seen += 1
            if seen == 3:
                steps = sched.steps
                assert sched.cancel("long")
        else:
            assert isinstance(ev, ErrorEvent) and ev.code == "CANCELLED"
    assert sched.steps - steps <= 2 and seen <= 5
    wait_for(lambda: sched.n_running == 0, "the cancelled request to leave")
    assert len(sched._free) == 8
    assert not sched.cancel("long")  # already gone


def test_full_worker_refuses_instead_of_queuing(net):
    s = Scheduler(net, IdTokenizer(), max_batch=2, ctx=128, max_waiting=1).start()
    try:
        handles = [s.submit(Request(f"f{i}", prompt(i), 50)) for i in range(3)]
        with pytest.raises(QueueFull):
            s.submit(Request("f3", prompt(3), 5))
        for h in handles:
            s.cancel(h.request.id)
        for h in handles:
            assert isinstance(tokens_of(h)[1], ErrorEvent)
    finally:
        s.stop()


def test_timeout(net):
    s = Scheduler(net, IdTokenizer(), max_batch=1, ctx=256).start()
    try:
        toks, end = tokens_of(s.submit(Request("t", prompt(6), 200, timeout_s=0.3)))
        assert isinstance(end, ErrorEvent) and end.code == "INFERENCE_TIMEOUT"
    finally:
        s.stop()


def test_prompt_validation(sched):
    with pytest.raises(ValueError, match="does not fit"):
        sched.submit(Request("big", [1] * 600, 5))
    with pytest.raises(ValueError, match="max_tokens"):
        sched.submit(Request("zero", prompt(1), 0))
    with pytest.raises(ValueError, match="temperature"):
        sched.submit(Request("nan", prompt(1), 5, SamplingParams(temperature=float("nan"))))


def test_long_prefill_does_not_stall_running_stream(sched):
    """A 401-token prompt prefills in 7 chunks of <= 64 tokens, each in a step where the running stream also
    decodes: the running stream gets a token in each (counted in event order, not in a time window)."""
    log: list[tuple[str, object]] = []
    running = sched.submit(Request("run", prompt(7), 300), on_event=lambda ev: log.append(("run", ev)))
    wait_for(lambda: log, "the running stream's first token")
    log.append(("submit", None))
    long = sched.submit(Request("long", prompt(8, 400), 2), on_event=lambda ev: log.append(("long", ev)))
    wait_for(lambda: long.done, "the long request to finish")
    sched.cancel("run")
    wait_for(lambda: running.done, "the running stream to end")
    who = [w for w, _ in log]
    submitted, first_long = who.index("submit"), who.index("long")
    during = who[submitted:first_long].count("run")
    assert "run" in who[first_long:], "the running stream ended before the long prompt's first token"
    # one step may have been running when the long prompt arrived: 7 or 8 tokens
    assert during >= 7, f"only {during} tokens of the running stream while the long prompt prefilled"


def test_bucketed_static_decode_batch_of_8_equals_alone(net):
    """The CUDA-graph decode path (models' static `decode`, batches padded to a bucket with a scratch slot),
    run eagerly on CPU: the same greedy tokens alone as in a batch, and the eager forward's logits."""
    from worker_orcd.engine.cuda_graphs import BucketedDecoder
    from worker_orcd.engine.kv_cache import SeqSpan

    static = Scheduler(net, IdTokenizer(), max_batch=8, ctx=256, prefill_chunk=64, graphs=True).start()
    try:
        assert static.kv.k[0].shape[0] == 9 and static._decoder is not None  # 8 slots and the scratch one
        reqs = [Request(f"g{i}", prompt(i, 20 + 3 * i), 12) for i in range(5)]  # 5 rows pad to a bucket of 8
        alone = [tokens_of(static.submit(r))[0] for r in reqs]
        together = [static.submit(Request(r.id + "b", r.prompt_ids, r.max_tokens)) for r in reqs]
        assert [tokens_of(h)[0] for h in together] == alone
        assert set(static._decoder.decoders) >= {1, 8}
    finally:
        static.stop()
    kv = net.new_kv_cache(64, 9)
    prompts = [prompt(i, 10 + i) for i in range(5)]
    for slot, p in enumerate(prompts):
        net.forward(torch.tensor(p), torch.arange(len(p)), kv, [SeqSpan(slot, 0, len(p))], torch.tensor([len(p) - 1]))
    rows, positions = [p[-1] for p in prompts], [len(p) for p in prompts]
    got = BucketedDecoder(net, kv, scratch_slot=8, capture=False).step(rows, positions, list(range(5))).clone()
    want = net.forward(torch.tensor(rows), torch.tensor(positions), kv, [SeqSpan(s, s, s + 1) for s in range(5)])
    # the head's output is bf16 (2^-8 relative steps): hidden states a few ulps apart round to neighbouring values
    assert got.shape == want.shape and float((got - want).norm() / want.norm()) < 1e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_prompt_chunks_ride_along_with_decode_rows(net):
    """Graphed prompts (CUDA's default, here on CPU within 16 rows, where CPU rows are independent): prompt chunks
    that join an overlapped decode step as rows of it give the tokens they give in a step of their own (one of them
    ends on its first token)."""
    reqs = [Request(f"r{i}", prompt(i, 3 + i), 1 if i == 4 else 8 + i, SamplingParams(temperature=0.8, seed=i)
                    if i % 2 else SamplingParams(), logprobs=2 if i == 3 else None) for i in range(6)]  # fmt: skip

    def run(overlap: bool) -> tuple[list, list[tuple[int, int]]]:
        s = Scheduler(net, IdTokenizer(), max_batch=8, ctx=256, prefill_chunk=64, graphs=True, overlap=overlap)
        s.pack_rows, s.graph_prompts, s.mix_rows = 16, True, 0  # as on CUDA: no eager mixed forward
        rode: list[tuple[int, int]] = []
        riders = s._riders
        s._riders = lambda n: (r := riders(n)) and rode.append((n, len(r))) or r
        s.start()
        try:
            first = [s.submit(r) for r in reqs[:2]]
            wait_for(lambda: all(h.stats.completion_tokens >= 1 for h in first), "the first requests to decode")
            rest = [s.submit(r) for r in reqs[2:]]
            return [[(e.token, e.logprob) if isinstance(e, TokenEvent) else type(e).__name__ for e in h]
                    for h in first + rest], rode
        finally:
            s.stop()

    (serial, _), (overlapped, rode) = run(False), run(True)
    assert overlapped == serial
    assert any(n > 0 for n, _ in rode), f"no prompt chunk rode along with decode rows: {rode}"


def test_overlapped_decode_gives_what_the_serial_loop_gives(net):
    """Decode step N + 1 launched before step N's tokens are handled (the default with CUDA graphs), run on
    CPU: the same tokens, logprobs and endings as the serial loop, for greedy, seeded, penalized and biased
    rows, logprobs, a stop string and end-of-generation, max_tokens, a logits processor (its steps land first),
    a cancel mid-stream, and requests joining while others decode."""
    from dataclasses import replace

    def ban_500(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
        logits[500] = float("-inf")
        return logits

    kinds = [SamplingParams(), SamplingParams(temperature=0.9, min_p=0.1, seed=0),
             SamplingParams(repetition_penalty=1.3, presence_penalty=0.4), SamplingParams(logit_bias=((EOS, 4.0),))]
    reqs = [Request(f"o{i}", prompt(i, 4 + 5 * i), 6 + 3 * i, replace(kinds[i % 4], seed=i),
                    logprobs=2 if i % 2 else None, logits_processor=ban_500 if i == 6 else None) for i in range(8)]

    def run(overlap: bool, graph_prompts: bool = False) -> list:
        s = Scheduler(net, IdTokenizer(), max_batch=8, ctx=256, prefill_chunk=64, graphs=True, overlap=overlap)
        assert s.overlap == overlap
        if graph_prompts:  # CUDA's packed prompts as rows of the decode step; 16 rows keep CPU rows independent
            s.pack_rows, s.graph_prompts, s.mix_rows = 16, True, 0
        s.start()
        try:
            first = [s.submit(r) for r in reqs[:5]]
            wait_for(lambda: any(h.stats.completion_tokens >= 2 for h in first), "the first requests to decode")
            rest = [s.submit(r) for r in reqs[5:]]
            cancelled = s.submit(Request("cancel-me", prompt(9, 10), 200))
            wait_for(lambda: cancelled.stats.completion_tokens >= 3, "the request to cancel to decode")
            s.cancel("cancel-me")
            assert isinstance(tokens_of(cancelled)[1], ErrorEvent)
            return [[(e.token, e.text, e.logprob) if isinstance(e, TokenEvent) else type(e).__name__ for e in h]
                    for h in first + rest]
        finally:
            s.stop()

    base = run(False)  # then two requests end early: on a stop id, on a stop string, each at its 4th token
    reqs[1] = replace(reqs[1], stop_token_ids=(base[1][3][0],))
    reqs[5] = replace(reqs[5], stop=[base[5][3][1]])
    serial, overlapped = run(False), run(True)
    assert overlapped == serial
    assert len(serial[1]) <= 5 and len(serial[5]) <= 5 and serial[1][-1] == serial[5][-1] == "EndEvent"
    # prompt chunks as decode rows: alone (serial) and riding along with the overlapped decode rows, the same
    assert run(True, graph_prompts=True) == run(False, graph_prompts=True)
