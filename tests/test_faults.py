"""Faults a serving worker must survive: an OOM in one request, the model file changing under it, SIGTERM,
and a crash followed by an immediate restart."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from worker_orcd.engine.sampler import SamplingParams
from worker_orcd.engine.scheduler import EndEvent, ErrorEvent, Request, Scheduler, TokenEvent

PROMPTS = [
    "The history of the printing press",
    "Photosynthesis is the process by which",
    "My favourite recipe for bread is",
    "The tallest mountains in the world",
    "In computer science, a hash table",
    "The rules of chess say that",
    "A short poem about autumn:",
]
LONG = "Tell me everything about the long and winding history of the city of Rome, from its founding by " \
       "Romulus to the fall of the western empire, in great detail please"  # longer than every PROMPT


@pytest.fixture(scope="module")
def model():
    import worker_orcd

    return worker_orcd.load(device="cpu")


def run(handle) -> tuple[str, int, EndEvent | ErrorEvent]:
    """(text, tokens, last event) of a finished request."""
    text, n, last = [], 0, None
    for ev in handle:
        if isinstance(ev, TokenEvent):
            text.append(ev.text)
            n += 1
        else:
            last = ev
    return "".join(text), n, last


def requests(model, tag: str, max_tokens: int = 20) -> list[Request]:
    # seeded sampling on odd indices: a retried forward must not disturb the sampler's state either
    return [Request(f"{tag}{i}", model.tokenize(p, add_special=True), max_tokens,
                    SamplingParams(temperature=0.8 * (i % 2), seed=i)) for i, p in enumerate(PROMPTS)]


class FailingForward:
    """Wraps net.forward: raises `error` when `when(positions, spans)` holds, else runs the real forward."""

    def __init__(self, net, error: Exception, when):
        self.real = net.forward
        self.error = error
        self.when = when
        self.calls = self.failures = 0

    def __call__(self, tokens, positions, kv, spans=None, rows=None):
        self.calls += 1
        if self.when(positions, spans):
            self.failures += 1
            raise self.error
        return self.real(tokens, positions, kv, spans, rows)


@pytest.fixture(scope="module")
def alone(model) -> dict[str, tuple[str, int]]:
    """Each request's text and token count when it runs by itself."""
    s = Scheduler(model.net, model.tokenizer, max_batch=8, ctx=256).start()
    try:
        out = {}
        for r in requests(model, "a"):
            text, n, last = run(s.submit(r))
            assert isinstance(last, EndEvent)
            out[r.id[1:]] = (text, n)
        return out
    finally:
        s.stop()


# -- an OOM in one request leaves the others running ----------------------------------------------

def test_oom_in_one_sequence_fails_only_that_one(model, alone, monkeypatch):
    poison = model.tokenize(LONG, add_special=True)
    limit = len(poison) + 2  # the long request "runs out of memory" once its KV reaches this position
    assert all(len(r.prompt_ids) + r.max_tokens < limit for r in requests(model, "x"))
    oom = FailingForward(model.net, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                         lambda positions, spans: int(positions.max()) >= limit)
    monkeypatch.setattr(model.net, "forward", oom)
    s = Scheduler(model.net, model.tokenizer, max_batch=8, ctx=256).start()
    try:
        bad = s.submit(Request("poison", poison, 40))
        good = [s.submit(r) for r in requests(model, "b")]
        text, n, last = run(bad)
        assert isinstance(last, ErrorEvent) and last.code == "VRAM_OOM", last
        assert n == 3 and "out of memory" in last.message  # it streamed until its KV reached `limit`
        for r, h in zip(requests(model, "b"), good):
            got_text, got_n, end = run(h)
            assert isinstance(end, EndEvent), end
            assert (got_text, got_n) == alone[r.id[1:]], r.id
        assert oom.failures >= 2  # the batched step, then the poison alone
        # the worker still serves, and the failed request's slot is free again
        assert s.idle and len(s._free) == 8
        text, n, last = run(s.submit(requests(model, "c")[0]))
        assert isinstance(last, EndEvent) and (text, n) == alone["0"]
    finally:
        s.stop()


def test_transient_batched_failure_fails_no_one(model, alone, monkeypatch):
    failed = []

    def once_batched(positions, spans) -> bool:
        if not failed and spans is not None and len(spans) >= 4:
            failed.append(len(spans))
            return True
        return False

    monkeypatch.setattr(model.net, "forward", FailingForward(model.net, RuntimeError("transient"), once_batched))
    s = Scheduler(model.net, model.tokenizer, max_batch=8, ctx=256).start()
    try:
        handles = [s.submit(r) for r in requests(model, "t")]
        for r, h in zip(requests(model, "t"), handles):
            text, n, end = run(h)
            assert isinstance(end, EndEvent), end
            assert (text, n) == alone[r.id[1:]], r.id
        assert failed, "the batched forward never failed: the test did not test anything"
    finally:
        s.stop()


def test_error_codes():
    from worker_orcd.engine.scheduler import error_code

    assert error_code(torch.cuda.OutOfMemoryError("CUDA out of memory")) == "VRAM_OOM"
    assert error_code(RuntimeError("CUDA error: an illegal memory access was encountered")) == "CUDA_ERROR"
    assert error_code(ValueError("bad")) == "INTERNAL"


# -- the model file changes under a running worker ------------------------------------------------

def mapped(path: Path) -> bool:
    """True while this process maps `path` (also after it was deleted)."""
    with open("/proc/self/maps") as maps:
        return any(str(path) in line for line in maps)


def test_model_file_truncated_or_deleted_under_running_requests(model, alone, smollm2_path, tmp_path):
    import worker_orcd

    copied, kept_mapped = tmp_path / "copied.gguf", tmp_path / "mapped.gguf"
    shutil.copyfile(smollm2_path, copied)
    shutil.copyfile(smollm2_path, kept_mapped)
    m_copy = worker_orcd.load(copied, device="cpu")  # the default for a 92 MB model: weights copied
    m_map = worker_orcd.load(kept_mapped, device="cpu", mmap=True)  # deleting a mapped file is safe; truncating not
    assert not mapped(copied) and mapped(kept_mapped)

    def truncate(p: Path) -> None:
        with open(p, "r+b") as f:
            f.truncate(0)

    for m, path, damage in ((m_copy, copied, truncate), (m_map, kept_mapped, Path.unlink)):
        s = Scheduler(m.net, m.tokenizer, max_batch=2, ctx=256).start()
        try:
            running = s.submit(requests(m, "d")[0])
            first = next(iter(running))
            assert isinstance(first, TokenEvent)
            damage(path)
            text, n, end = run(running)
            assert isinstance(end, EndEvent), end
            assert (first.text + text, n + 1) == alone["0"]
            text, n, end = run(s.submit(requests(m, "e")[1]))  # a request that starts after the damage
            assert isinstance(end, EndEvent) and (text, n) == alone["1"]
        finally:
            s.stop()
    assert os.path.getsize(copied) == 0 and not kept_mapped.exists()
