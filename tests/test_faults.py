"""Faults a serving worker must survive: an OOM in one request, the model file changing under it, SIGTERM,
and a crash followed by an immediate restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_helpers import PROMPTS as SERVER_PROMPTS
from tests.waiting import wait_for
from worker_orcd.engine.sampler import SamplingParams
from worker_orcd.engine.scheduler import EndEvent, ErrorEvent, Request, Scheduler, TokenEvent

PROMPTS = SERVER_PROMPTS[:7]
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


def test_oom_over_http_is_an_error_event_and_the_worker_keeps_serving(model, alone, monkeypatch):
    from tests.test_server import LiveServer, sse_events
    from worker_orcd.server import ServeConfig

    poison = LONG
    limit = len(model.tokenize(poison, add_special=True)) + 2
    monkeypatch.setattr(model.net, "forward", FailingForward(
        model.net, torch.cuda.OutOfMemoryError("CUDA out of memory"), lambda pos, spans: int(pos.max()) >= limit))

    def execute(uri: str, job: str, prompt: str, temperature: float, seed: int) -> list[tuple[str, dict]]:
        body = {"job_id": job, "prompt": prompt, "max_tokens": 20, "temperature": temperature, "seed": seed}
        with httpx.stream("POST", uri + "/execute", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            return list(sse_events(resp))

    def text_of(events: list[tuple[str, dict]]) -> str:
        return "".join(d["t"] for name, d in events if name == "token")

    with LiveServer(model, ServeConfig(port=0, ctx=256, max_batch=8)) as server, ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(execute, server.uri, "poison", poison, 0.0, 0)]
        jobs += [pool.submit(execute, server.uri, f"ok{i}", p, 0.8 * (i % 2), i) for i, p in enumerate(PROMPTS)]
        results = [j.result() for j in jobs]
        name, err = results[0][-1]
        assert name == "error" and err["code"] == "VRAM_OOM" and err["retriable"] is True, results[0][-1]
        for i, events in enumerate(results[1:]):
            assert events[-1][0] == "end" and events[-1][1]["tokens_out"] == alone[str(i)][1]
            assert text_of(events) == alone[str(i)][0]
        events = execute(server.uri, "after", PROMPTS[0], 0.0, 0)
        assert events[-1][0] == "end" and text_of(events) == alone["0"][0]
        assert httpx.get(server.uri + "/health").json()["status"] == "ready"


# -- SIGTERM drains; SIGKILL then an immediate restart on the same port ---------------------------

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy decoding keeps counting: the stream runs to max_tokens


class ServeProcess:
    """`worker-orcd serve` in a subprocess; `uri` once it prints its ready line."""

    def __init__(self, port: int, cwd: Path, log: Path):
        cmd = [sys.executable, "-m", "worker_orcd.cli", "serve", "--port", str(port), "--device", "cpu",
               "--ctx", "256", "--max-batch", "4"]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()  # blocks until ready, or "" if the process died
        assert line.startswith("ready:"), f"serve exited {self.proc.poll()}: {log.read_text()[-2000:]}"
        self.uri = line.rsplit(" at ", 1)[1].strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_stream(client: httpx.Client, path: str, body: dict):
    """A started stream: (response, its SSE events iterator) after the first token arrived."""
    from tests.test_server import sse_events

    resp = client.send(client.build_request("POST", path, json=body), stream=True)
    assert resp.status_code == 200, resp.read()
    events = sse_events(resp)
    for name, data in events:
        if name == "token" or (name is None and data != "[DONE]" and data["choices"][0]["text"]):
            return resp, events
    raise AssertionError("the stream ended before its first token")


def test_sigkill_then_immediate_restart_then_sigterm_drains(tmp_path):
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    port = free_port()
    first = ServeProcess(port, run_dir, tmp_path / "first.log")
    try:
        with httpx.Client(base_url=first.uri, timeout=60) as c:  # a stream open at the crash
            _, events = open_stream(c, "/execute", {"job_id": "crash", "prompt": COUNTING, "max_tokens": 200})
            first.proc.send_signal(signal.SIGKILL)
            assert first.proc.wait(10) == -signal.SIGKILL
            with pytest.raises(httpx.TransportError):
                list(events)
    finally:
        first.close()

    started = time.monotonic()
    second = ServeProcess(port, run_dir, tmp_path / "second.log")  # same port, nothing cleaned up by hand
    try:
        assert second.uri == f"http://127.0.0.1:{port}" and time.monotonic() - started < 90
        assert httpx.get(second.uri + "/ready").status_code == 200
        with httpx.Client(base_url=second.uri, timeout=60) as c:
            streams = [open_stream(c, "/execute", {"job_id": f"d{i}", "prompt": COUNTING, "max_tokens": 40})
                       for i in range(2)]
            streams.append(open_stream(c, "/v1/completions", {
                "model": "SmolLM2-135M-Instruct.Q4_1", "prompt": COUNTING, "max_tokens": 40, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}))
            second.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: c.get("/health").json()["status"] == "draining", "the worker to drain")
            for path, body in (("/execute", {"job_id": "late", "prompt": "Hi", "max_tokens": 4}),
                               ("/v1/completions", {"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Hi"})):
                refused = c.post(path, json=body)
                assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
            for _, events in streams[:2]:  # the running streams finish in full
                last = list(events)[-1]
                assert last == ("end", last[1]) and last[1]["tokens_out"] == 40
                assert last[1]["stop_reason"] == "max_tokens"
            rest = [data for _, data in streams[2][1]]
            assert rest[-1] == "[DONE]" and rest[-2]["usage"]["completion_tokens"] == 40
            assert rest[-3]["choices"][0]["finish_reason"] == "length"
        assert second.proc.wait(30) == 0
    finally:
        second.close()
    assert not list(run_dir.iterdir()), "the worker left files behind"
