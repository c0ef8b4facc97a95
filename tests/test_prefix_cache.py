"""Prefix caching (issue 16): the block manager's bookkeeping under random interleavings, and schedulers with the
cache on giving exactly the greedy tokens they give with it off (tiny fixture models: dense, sliding-window,
MoE with sinks; the default model), with a pool far smaller than the working set too.

The cache must change no result: the scheduler splits a prompt into the same chunks with or without a cached
prefix and keeps every row on the same kernels (engine/scheduler.py), so logits are compared bit for bit.
"""

from __future__ import annotations

import random

import pytest
import torch

from worker_orcd.engine.block_manager import BlockManager, KVCacheFull, chunk_tag
from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.scheduler import Request, Scheduler, TokenEvent

fixtures = pytest.importorskip("tests.fixtures.hf_to_gguf")


# -- the block manager ---------------------------------------------------------------------------------


def test_pages_are_shared_by_reference_and_evicted_least_recent_first():
    bm = BlockManager(6, 16, caching=True)
    a = list(range(100, 150))  # 3 full pages and 2 tokens
    bm.ensure(0, len(a))
    bm.commit(0, a)
    assert bm.cached_pages(a) == 3 and bm.cached_pages(a[:48]) == 2  # never the last token's page
    assert bm.share(1, a[:40] + [7] * 20, 2) is None
    assert bm.table(1) == bm.table(0)[:2] and [bm.refs[b] for b in bm.table(0)] == [2, 2, 1, 1]
    bm.release(0)
    assert bm.refs[bm.table(1)[0]] == 1 and bm.n_free == 4 and bm.n_cached == 1  # page 2 waits, cached
    bm.ensure(1, 60)  # two more blocks: the never-cached ones go first
    assert bm.cached_pages(a) == 3 and bm.n_cached == 1
    bm.release(1)
    bm.ensure(2, 16 * 6)  # the whole pool: every cached page is evicted
    assert bm.cached_pages(a) == 0 and bm.n_free == 0
    with pytest.raises(KVCacheFull):
        bm.ensure(2, 16 * 7)


def test_whole_context_block_is_taken_over_when_free_else_copied():
    bm = BlockManager(3, 256, caching=True)
    a = list(range(100, 180))
    bm.ensure(0, 80)
    bm.commit(0, a)
    src = bm.table(0)[0]
    assert bm.share(1, a + [1], 5) == (src, bm.table(1)[0], 80)  # held by seq 0: copy its rows
    copy = bm.table(1)[0]
    bm.release(0)
    bm.release(1)
    assert bm.share(2, a[:64] + [2] * 30, 4) is None and bm.table(2) == [copy]  # free: taken over in place
    assert bm.cached_pages(a + [3]) == 4  # its pages past the run were forgotten (they will be overwritten)


def test_a_page_is_found_only_as_it_was_computed():
    """Page tags: pages a long chunk computed are found only by a prompt whose own prefill computes that chunk
    (its span and every id); a page of mixed computations and the pages after it are never registered."""
    bm = BlockManager(8, 16, caching=True)
    a = list(range(100, 180))  # 5 pages
    tags = [chunk_tag(0, 32, a[:32])] * 2 + [b"", None, b""]
    assert bm.share(0, a, 0, tags) is None
    bm.ensure(0, len(a))
    bm.commit(0, a)
    assert bm.cached_pages(a + [1], tags) == 3  # the 4th page mixes computations: not registered, nor the 5th
    assert bm.cached_pages(a + [1]) == 0  # as rows computed alone: another computation
    assert bm.cached_pages(a + [1], [chunk_tag(0, 32, a[:31] + [5])] * 2) == 0  # the chunk held other ids
    assert bm.cached_pages(a + [1], [chunk_tag(0, 48, a[:48])] * 2) == 0  # or another span
    with pytest.raises(ValueError, match="mixes computations"):
        bm.share(1, a, 4, tags)

@pytest.mark.parametrize("block_size", [16, 64, 512])
def test_random_interleavings_keep_references_and_contents(block_size):
    """Admit (with the longest cached run), grow, commit and release sequences at random over a small pool; a
    simulated KV store follows every write and copy. After every operation: each block's reference count is
    the number of tables holding it, exactly the unheld blocks are free, the registry is consistent, a block
    handed out was free, and every run shared holds exactly its prompt's tokens (so no referenced block was
    ever evicted or overwritten)."""
    rng = random.Random(block_size)
    n_blocks = 24 if block_size == 16 else 6
    bm = BlockManager(n_blocks, block_size, caching=True)
    store: dict[tuple[int, int], int] = {}  # (block, offset) -> the token whose KV is there
    written: dict[int, list[int]] = {}  # seq -> tokens at its positions 0..
    stems = [[rng.randrange(50) for _ in range(rng.randrange(20, 140))] for _ in range(5)]
    shared = 0

    def write(seq: int, start: int) -> None:
        table = bm.table(seq)
        for p in range(start, len(written[seq])):
            block = table[p // block_size]
            assert bm.refs[block] == 1, "a sequence wrote into a block another one holds"
            store[block, p % block_size] = written[seq][p]

    for step in range(3000):
        op = rng.random()
        free_before = {b for b in range(n_blocks) if bm.refs[b] == 0}
        if (op < 0.3 or not written) and len(written) < 5:
            seq = step
            stem = rng.choice(stems)
            prompt = stem[: rng.randrange(1, len(stem) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
            pages = rng.randrange(bm.cached_pages(prompt) + 1)
            held_before = {b for t in written for b in bm.table(t)}
            if bm.n_free < (0 if bm.by_reference else 1):
                continue
            copy = bm.share(seq, prompt, pages)
            n = pages * bm.page
            if copy is not None:
                src, dst, count = copy
                assert dst in free_before and count == n
                for p in range(count):
                    store[dst, p] = store[src, p]
            for p in range(n):  # the run holds the prompt's tokens
                table = bm.table(seq)
                assert store.get((table[p // block_size], p % block_size)) == prompt[p]
            assert set(bm.table(seq)) - held_before <= free_before
            shared += n
            written[seq] = prompt
            try:  # then its prompt is prefilled past the run
                assert set(bm.ensure(seq, len(prompt))) <= free_before
            except KVCacheFull:
                bm.release(seq)
                del written[seq]
                continue
            write(seq, n)
            bm.commit(seq, prompt)
        elif op < 0.75:
            seq = rng.choice(list(written))
            grow = rng.randrange(1, 40)
            tokens = written[seq] + [rng.randrange(50) for _ in range(grow)]
            try:
                new = bm.ensure(seq, len(tokens))
            except KVCacheFull:
                assert bm.blocks_for(len(tokens)) - len(bm.table(seq)) > len(free_before)
                continue
            assert set(new) <= free_before
            start = len(written[seq])
            written[seq] = tokens
            write(seq, start)
            bm.commit(seq, tokens)
        else:
            seq = rng.choice(list(written))
            bm.release(seq)
            del written[seq]
        holders = [b for t in written for b in bm.table(t)]
        assert all(bm.refs[b] == holders.count(b) for b in range(n_blocks))
        assert set(bm._free) == {b for b in range(n_blocks) if bm.refs[b] == 0}
        for h, (block, page) in bm._cached.items():
            assert bm._pages[block][page] == h
    assert shared > 1000, shared


# -- schedulers with the cache on and off ---------------------------------------------------------------


class Tok:
    eog_ids: list[int] = []

    def stream_decoder(self, continuation: bool = False):
        return type("D", (), {"push": lambda self, t: "", "flush": lambda self: ""})()


def tiny_net(tmp_path, arch: str, gtype: str = "F32", device: str = "cpu", **overrides):
    import worker_orcd

    hf = fixtures.make_tiny_model(arch, seed=0, **overrides)
    return worker_orcd.load(fixtures.write_gguf(hf, tmp_path / f"{arch}-{gtype}.gguf", gtype), device=device).net


def shared_prompts(vocab: int, n: int, stems: int, stem_len: int, seed: int = 0) -> list[list[int]]:
    """n prompts, each a prefix of one of `stems` stems (cut anywhere: inside a page, past a window) plus its
    own tail."""
    rng = random.Random(seed)
    roots = [[rng.randrange(vocab) for _ in range(stem_len)] for _ in range(stems)]
    out = []
    for _ in range(n):
        root = rng.choice(roots)
        out.append(root[: rng.randrange(1, stem_len + 1)] + [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))])
    return out


class Run:
    """Greedy tokens and the logits they were picked from, per prompt, and the prompt tokens served from the
    cache. Equal runs have bitwise equal logits at every step, not only the same argmax."""

    def __init__(self, net, prompts: list[list[int]], cache: bool, max_tokens: int = 6, **kw):
        s = Scheduler(net, Tok(), max_waiting=len(prompts), prefix_cache=cache, **kw).start()
        self.logits: list[list[torch.Tensor]] = [[] for _ in prompts]
        try:
            handles = [s.submit(Request(f"r{i}", p, max_tokens, logits_processor=self._keep(i)))
                       for i, p in enumerate(prompts)]
            self.tokens = [[e.token for e in h if isinstance(e, TokenEvent)] for h in handles]
            self.cached = sum(h.stats.cached_tokens for h in handles)
        finally:
            s.stop()

    def _keep(self, i: int):
        def keep(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
            self.logits[i].append(logits.clone())
            return logits

        return keep

    def __eq__(self, other: Run) -> bool:
        return self.close_to(other, 0.0)

    def close_to(self, other: Run, rel: float) -> bool:
        """The same tokens, from logits within `rel` (relative, per step; 0: bitwise)."""
        def near(x, y):
            return torch.equal(x, y) if rel == 0 else float((x - y).norm() / y.norm()) <= rel

        return self.tokens == other.tokens and all(
            len(a) == len(b) and all(near(x, y) for x, y in zip(a, b)) for a, b in zip(self.logits, other.logits))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt-oss"])
def test_fifty_requests_sharing_prefixes_equal_without_the_cache(tmp_path, arch):
    """50 greedy requests whose prompts share prefixes of every length (ending inside a page, past the
    4-position sliding window of gemma3 and gpt-oss), 4 at a time over whole-context CPU blocks (runs taken
    over or copied): the same tokens and logits as with the cache off, and many shared tokens served from it.
    GPT-OSS's logits are only close on CPU: an expert's matmul takes the packed or the float32 path by how
    many of the chunk's tokens route to it, which the chunk's start changes (the GPU's per-pair MoE does not)."""
    net = tiny_net(tmp_path, arch)
    prompts = shared_prompts(net.cfg.vocab_size, 50, 4, 200)
    off = Run(net, prompts, False, max_batch=4, ctx=256, prefill_chunk=64)
    on = Run(net, prompts, True, max_batch=4, ctx=256, prefill_chunk=64)
    assert off.cached == 0 and on.close_to(off, 1e-5 if arch == "gpt-oss" else 0.0)
    assert on.cached > sum(len(p) for p in prompts) // 4, f"only {on.cached} prompt tokens came from the cache"


@pytest.mark.gpu
@pytest.mark.parametrize("arch,gtype,kv_blocks", [("llama", "Q8_0", None), ("gemma3", "Q8_0", None),
                                                  ("gpt-oss", "MXFP4", None), ("gpt-oss", "MXFP4", 40)])
def test_fifty_requests_on_cuda_equal_without_the_cache(tmp_path, arch, gtype, kv_blocks):
    """The same on the GPU, where runs are shared by reference (16-position blocks) and decode replays CUDA
    graphs: bitwise the same logits with the cache on and off, GPT-OSS's MoE included (prompt chunks of <= 64
    rows: every kernel computes a row alone). kv_blocks=40: a pool far smaller than the working set."""
    net = tiny_net(tmp_path, arch, gtype, "cuda")
    prompts = shared_prompts(net.cfg.vocab_size, 50, 4, 200)
    kw = dict(max_batch=4, ctx=256, prefill_chunk=64, kv_blocks=kv_blocks)
    off = Run(net, prompts, False, **kw)
    on = Run(net, prompts, True, **kw)
    query = sum(len(p) for p in prompts)
    print(f"{arch} {gtype} pool {kv_blocks or 'full'}: hit rate {on.cached / query:.1%}")
    assert off.cached == 0 and on == off and on.cached > 0


@pytest.mark.gpu
def test_long_prompt_chunks_on_cuda_equal_without_the_cache(tmp_path):
    """Prompts of up to ~630 tokens with the default prefill_chunk (256): chunks of more than 128 rows meet
    cuBLAS and the grouped MoE, whose rows depend on the chunk, so the page tags keep reuse to what each
    prompt's own prefill computes (engine/block_manager.py): the cache still changes no bit."""
    net = tiny_net(tmp_path, "gpt-oss", "MXFP4", "cuda", max_position_embeddings=1024)
    prompts = shared_prompts(net.cfg.vocab_size, 24, 3, 600, seed=2)
    kw = dict(max_batch=4, ctx=768, prefill_chunk=256)
    off = Run(net, prompts, False, **kw)
    on = Run(net, prompts, True, **kw)
    assert off.cached == 0 and on == off and on.cached > 0

class PagedNet:
    """A CPU model whose KV pool has CUDA's 16-position blocks, so runs are shared by reference as on a GPU."""

    def __init__(self, net):
        self.net = net

    def __getattr__(self, name):
        return getattr(self.net, name)

    def new_kv_cache(self, max_len: int, n_slots: int = 1, dtype=None, n_blocks: int | None = None) -> KVCache:
        like = self.net.new_kv_cache(1)
        return KVCache(len(like.k), like.k[0].shape[1], like.k[0].shape[3], max_len, n_slots, dtype or like.dtype,
                       "cpu", head_dim_v=like.v[0].shape[3], block_size=16, n_blocks=n_blocks)


def test_blocks_shared_by_reference_under_memory_pressure(tmp_path):
    """16-position blocks shared by reference, with a pool of 100 blocks where the 30 requests' prompts span
    ~1,200 distinct pages: eviction keeps every request exact and part of the cache still hits; a pool as big
    as the working set hits more. (Prompts past 512 tokens: with these small blocks a prompt chunk cannot read
    512 keys, so only chunks ending past 512 are row-for-row the same whatever their length.)"""
    net = PagedNet(tiny_net(tmp_path, "llama", max_position_embeddings=1024))
    rng = random.Random(3)
    roots = [[rng.randrange(net.cfg.vocab_size) for _ in range(700)] for _ in range(6)]
    prompts = [r[: rng.randrange(520, 700)] + [rng.randrange(300) for _ in range(rng.randrange(1, 20))]
               for r in (rng.choice(roots) for _ in range(30))]
    query = sum(len(p) for p in prompts)
    kw = dict(max_batch=2, ctx=768, prefill_chunk=64)
    off = Run(net, prompts, False, **kw)
    small = Run(net, prompts, True, kv_blocks=100, **kw)
    big = Run(net, prompts, True, **kw, kv_blocks=2000)
    print(f"hit rate: pool of 100 blocks {small.cached / query:.1%}, of 2000 blocks {big.cached / query:.1%}")
    assert small == off and big == off
    assert 0 < small.cached < big.cached


def test_long_chunks_are_reused_only_whole(tmp_path):
    """CUDA's rule on the CPU scheduler (pack_rows 128: a chunk of more rows meets kernels whose rows depend on
    the chunk): a cached prefix is reused only where this prompt's own prefill would compute the same long
    chunk, and never up to a point inside one of its long chunks."""
    net = PagedNet(tiny_net(tmp_path, "llama", max_position_embeddings=1024))
    rng = random.Random(5)
    a = [rng.randrange(net.cfg.vocab_size) for _ in range(600)]
    s = Scheduler(net, Tok(), max_batch=1, ctx=1024, prefill_chunk=256, prefix_cache=True)
    s.pack_rows = 128
    assert s._long_chunks(600) == [(0, 256), (256, 512)] and s._long_chunks(250) == [(0, 250)]
    tags = s._page_tags(a[:700 - 100] + [0] * 100)  # 700 tokens: [512, 700) is long and cuts page 43
    assert tags[0] == tags[15] != tags[16] and tags[43] is None and len(tags) == 44
    s.start()
    try:
        def cached(prompt: list[int]) -> int:
            h = s.submit(Request(f"r{len(prompt)}", prompt, 9))
            list(h)
            return h.stats.cached_tokens

        assert cached(a) == 0
        assert cached(a[:300] + [1] * 100) == 256  # its chunk [256, 400) is not A's [256, 512): only [0, 256)
        assert cached(a[:200] + [2] * 50) == 0  # one long chunk [0, 250): A never computed it
        assert cached(a + [3]) == 576  # A's long chunks and its short one; the cap of the last small chunk
    finally:
        s.stop()

def test_default_model_with_the_cache_equals_without(smollm2_path):
    """The default model (Q4_1: packed kernels for <= 16 rows, float32 above), 10 requests sharing prefixes of
    up to 300 tokens, two at a time."""
    import worker_orcd

    net = worker_orcd.load(smollm2_path, device="cpu").net
    prompts = shared_prompts(40000, 10, 2, 300, seed=5)
    off = Run(net, prompts, False, max_tokens=4, max_batch=2, ctx=512, prefill_chunk=128)
    on = Run(net, prompts, True, max_tokens=4, max_batch=2, ctx=512, prefill_chunk=128)
    assert on == off and on.cached > 0


# -- over HTTP: usage, metrics, a conversation ----------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    import worker_orcd
    from tests.server_helpers import LiveServer
    from worker_orcd.server import ServeConfig

    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=2048, max_batch=2, max_tokens_out=64)
    with LiveServer(worker_orcd.load(device="cpu"), cfg) as s:
        yield s


def test_ten_turn_conversation_prefills_only_new_tokens(server):
    """Each turn resends the whole conversation: from the second on, everything the previous turn's prompt
    held (but the part of its last page) comes from the cache, as `cached_tokens` says; a streamed turn
    reports the same usage, and /metrics counts the queries and hits."""
    import httpx

    from tests.server_helpers import sse_events

    topics = ["bread", "rivers", "chess", "autumn", "bridges", "owls", "tea", "maps", "bells", "kites"]
    messages = [{"role": "system", "content": "You are a helpful assistant who answers in one sentence."}]
    with httpx.Client(base_url=server.uri, timeout=300) as http:
        prompts, cached = [], []
        for turn, topic in enumerate(topics):
            messages.append({"role": "user", "content": f"Tell me one fact about {topic}."})
            body = {"messages": messages, "max_tokens": 12, "temperature": 0}
            if turn == 5:  # a streamed turn: usage in the last chunk
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    chunks = [d for _, d in sse_events(resp) if d != "[DONE]"]
                usage = chunks[-1]["usage"]
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            else:
                resp = http.post("/v1/chat/completions", json=body).json()
                usage, text = resp["usage"], resp["choices"][0]["message"]["content"]
            prompts.append(usage["prompt_tokens"])
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
            messages.append({"role": "assistant", "content": text})
        print("prompt tokens", prompts, "cached", cached)
        for t in range(1, len(topics)):
            assert prompts[t - 1] - 16 <= cached[t] < prompts[t], (t, prompts, cached)
        body = {"prompt": "Once upon a time, in a land far away, there lived", "max_tokens": 2, "temperature": 0}
        first = http.post("/v1/completions", json=body).json()["usage"]
        again = http.post("/v1/completions", json={**body, "max_tokens": 3}).json()["usage"]
        assert first["prompt_tokens_details"]["cached_tokens"] == 0  # 12 tokens: too short to cache
        assert again["prompt_tokens_details"]["cached_tokens"] == 0
        metrics = http.get("/metrics").text
    hits = float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith("worker_prefix_cache_hits_total")))
    queries = float(next(ln.split()[1] for ln in metrics.splitlines()
                         if ln.startswith("worker_prefix_cache_queries_total")))
    assert hits == sum(cached) and queries >= sum(prompts)


def test_serve_has_a_no_prefix_cache_flag():
    from typer.testing import CliRunner

    from worker_orcd.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--no-prefix-cache" in out
