"""The HTTP server end to end: a real uvicorn on a loopback port serving the default model on CPU."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from tests.server_helpers import PROMPTS, LiveServer, sse_events
from tests.waiting import wait_for
from worker_orcd.server import ServeConfig

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy decoding keeps counting: a stream that does not end early


@pytest.fixture(scope="module")
def model():
    import worker_orcd

    return worker_orcd.load(device="cpu")


@pytest.fixture(scope="module")
def server(model):
    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=1024, max_batch=8, max_tokens_out=256)
    with LiveServer(model, cfg) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.uri, timeout=120) as c:
        yield c


def execute(http: httpx.Client, job_id: str, prompt: str, max_tokens: int, **kw) -> list[tuple[str, dict]]:
    body = {"job_id": job_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **kw}
    with http.stream("POST", "/execute", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(resp))


# -- OpenAI API ------------------------------------------------------------------------------------

def test_openai_chat_stream_equals_nonstream(server):
    import openai

    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    model_id = client.models.list().data[0].id
    kw = dict(model=model_id, messages=[{"role": "user", "content": "Write one sentence about the sea."}],
              max_tokens=24, temperature=0.8, top_p=0.95, seed=7)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.choices[0].finish_reason in ("stop", "length")


def test_openai_completion_stream_equals_nonstream(server):
    import openai

    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    model_id = client.models.list().data[0].id
    kw = dict(model=model_id, prompt="Once upon a time", max_tokens=20, temperature=0.7, seed=11)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and text == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_openai_stop_and_greedy_determinism(http, server):
    model_id = server.worker.model_id
    body = {"model": model_id, "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0}
    a = http.post("/v1/completions", json=body).json()
    b = http.post("/v1/completions", json=body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    text = a["choices"][0]["text"]
    stop = text.strip()[:2] if len(text.strip()) >= 2 else None
    if stop:
        c = http.post("/v1/completions", json={**body, "stop": [stop]}).json()
        assert stop not in c["choices"][0]["text"] and c["choices"][0]["finish_reason"] == "stop"


def test_tokenize_detokenize(http, server):
    r = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == server.worker.ctx
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].endswith("Hello world")
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2


# -- worker API ------------------------------------------------------------------------------------

def test_execute_streams_started_tokens_end(http):
    events = execute(http, "job-utf8", "Translate to French, German and Japanese: good morning, café!", 40)
    names = [n for n, _ in events]
    assert names[0] == "started" and names[-1] == "end"
    assert set(names[1:-1]) <= {"token", "metrics"} and "token" in names
    assert events[0][1]["job_id"] == "job-utf8"
    tokens = [d for n, d in events if n == "token"]
    assert all(isinstance(d["t"], str) and d["t"] and "\ufffd" not in d["t"] for d in tokens)
    assert [d["i"] for d in tokens] == sorted(d["i"] for d in tokens)
    end = events[-1][1]
    assert end["stop_reason"] in ("max_tokens", "eos", "stop_sequence") and end["tokens_out"] >= len(tokens)
    assert end["decode_time_ms"] >= 0


def test_cancel_mid_stream(http, server):
    body = {"job_id": "job-cancel", "prompt": COUNTING, "max_tokens": 250, "temperature": 0.0}
    sched = server.worker.scheduler
    with http.stream("POST", "/execute", json=body) as resp:
        seen, last = 0, None
        for last in sse_events(resp):
            if last[0] == "token":
                seen += 1
                if seen == 3:
                    r = httpx.post(server.uri + "/cancel", json={"job_id": "job-cancel"})
                    assert r.status_code == 202
                    steps = sched.steps  # the cancel is registered; at most the step in flight still runs
    name, data = last
    assert name == "error" and data["code"] == "CANCELLED" and data["retriable"] is False
    assert sched.steps - steps <= 1 and not sched.active("job-cancel")
    assert httpx.post(server.uri + "/cancel", json={"job_id": "job-cancel"}).status_code == 202
    assert httpx.post(server.uri + "/cancel", json={"job_id": "never-seen"}).status_code == 202


def test_client_disconnect_frees_the_slot(http, server):
    body = {"job_id": "job-gone", "prompt": COUNTING, "max_tokens": 250}
    with http.stream("POST", "/execute", json=body) as resp:
        for name, _ in sse_events(resp):
            if name == "token":
                break
    wait_for(lambda: not server.worker.scheduler.active("job-gone"), "the disconnected job to leave")


def finished_requests(server) -> dict[str, float]:
    text = httpx.get(server.uri + "/metrics").text
    return {k: float(v) for k, v in re.findall(r'^worker_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def test_nonstreaming_client_that_leaves_cancels_its_job(server):
    body = {"model": server.worker.model_id, "prompt": COUNTING, "max_tokens": 250, "temperature": 0}
    before = finished_requests(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.uri + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    # the job ends either way (cancelled, or all 250 tokens): wait for it to be counted, then say which
    wait_for(lambda: sum(finished_requests(server).values()) > sum(before.values()), "the job to end")
    after = finished_requests(server)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1, f"not cancelled: {before} -> {after}"


def test_health_ready_metrics(http, server):
    h = http.get("/health").json()
    assert h["status"] in ("ready", "busy") and h["model"] == server.worker.model_id
    assert h["vram_bytes"] == server.worker.vram_bytes > 0 and h["architecture"] == "llama"
    assert h["quant"] == "Q4_1" and h["device"] == "cpu" and h["vram_resident"] is True
    assert http.get("/ready").status_code == 200
    text = http.get("/metrics").text
    for name in ["worker_vram_bytes", "worker_requests_total", "worker_tokens_in_total",
                 "worker_tokens_generated_total", "worker_inference_duration_ms_bucket", "worker_uptime_seconds",
                 "worker_time_to_first_token_ms_bucket", "worker_inter_token_latency_ms_bucket",
                 "worker_running_sequences", "worker_waiting_sequences", "worker_kv_cache_usage_ratio",
                 "worker_kv_blocks_used", "worker_kv_blocks_total"]:
        assert re.search(rf"^{name}[ {{]", text, re.M), f"{name} missing from /metrics"


def test_eight_concurrent_greedy_streams_equal_alone_and_share_steps(http, server, monkeypatch):
    """Same texts alone and together, and together they decode in shared steps (counted, not timed: the
    speed of 1 vs 8 streams is bench/serve_throughput.py's)."""
    n_tokens = 32
    sched = server.worker.scheduler

    def run(i: int, tag: str) -> tuple[str, int]:
        events = execute(http, f"g{tag}{i}", PROMPTS[i], n_tokens)
        text = "".join(d["t"] for n, d in events if n == "token")
        assert events[-1][0] == "end", events[-1]
        return text, events[-1][1]["tokens_out"]

    wait_for(lambda: sched.idle, "the scheduler to be idle")
    steps0 = sched.steps
    alone = [run(i, "a") for i in range(8)]
    # one step per token (a prefill gives the first); the counter moves just after a step's last event
    wait_for(lambda: sched.steps - steps0 == sum(n for _, n in alone), "one step per token alone")
    # the first forward waits until all 8 requests are in, so their arrival times cannot matter
    gate, forward = threading.Event(), sched.net.forward

    def gated_forward(*args, **kwargs):
        gate.wait(60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(sched.net, "forward", gated_forward)
    steps0 = sched.steps
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(run, i, "b") for i in range(8)]
        wait_for(lambda: sched.n_running + sched.n_waiting == 8 or any(f.done() for f in futures),
                 "8 requests to arrive")
        gate.set()
        together = [f.result() for f in futures]
    assert together == alone
    # one prompt prefills per step, the first 8 steps, then 31 decode steps after the last one: 39 at most
    steps = sched.steps - steps0
    assert steps <= n_tokens + 7, f"{steps} steps for 8 streams of {n_tokens} tokens: they did not share steps"


def test_full_worker_answers_429_and_shutdown_drains(model):
    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=256, max_batch=1, max_waiting=0)
    with LiveServer(model, cfg) as s, httpx.Client(base_url=s.uri, timeout=60) as http:
        body = {"job_id": "only", "prompt": COUNTING, "max_tokens": 24, "temperature": 0.0}
        with http.stream("POST", "/execute", json=body) as resp:
            events = sse_events(resp)
            assert next(events)[0] == "started"
            full = http.post("/execute", json={**body, "job_id": "second"})
            assert full.status_code == 429 and full.headers["Retry-After"] and full.json()["error"]["code"] == "BUSY"
            assert http.post("/shutdown").status_code == 202
            assert http.get("/health").json()["status"] == "draining"
            assert http.get("/ready").status_code == 503
            late = http.post("/execute", json={**body, "job_id": "late"})
            assert late.status_code == 503 and late.headers["Retry-After"]
            assert [n for n, _ in events][-1] == "end"  # the running stream finished
        s._thread.join(30)
        assert not s._thread.is_alive(), "the server did not exit after draining"


def test_kv_budget_bounds_the_batch(model):
    from worker_orcd.server.worker import kv_bytes_per_token, plan_kv

    per_seq = kv_bytes_per_token(model.net) * 512
    cfg = ServeConfig(ctx=512, max_batch=8, kv_cache_size_mb=(3 * per_seq) // 2**20 + 1)
    assert plan_kv(kv_bytes_per_token(model.net), model.config.context_length, cfg) == (512, 3)
    with pytest.raises(ValueError, match="--kv-cache-size-mb"):
        plan_kv(kv_bytes_per_token(model.net), model.config.context_length, ServeConfig(ctx=512, kv_cache_size_mb=1))


# -- validation ------------------------------------------------------------------------------------

M = "SmolLM2-135M-Instruct.Q4_1"
LONG = "word " * 1100
CLE = "context_length_exceeded"
# the OpenAI API answers 400 (OpenAI's shape, `param`); the worker API keeps 422/413 (its shape, `field`)
CASES = [
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/completions", '{"model": "' + M + '", "prompt": ', 400, "body"),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": "five"}, 400, "max_tokens"),
    ("/v1/completions", {"model": M, "prompt": 12}, 400, "prompt"),
    ("/v1/chat/completions", {"model": M, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, 400,
     "frequency_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "mirostat": 2}, 400, "mirostat"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "foo": 1}]}, 400, "messages[0].foo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice"),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", '{"model": "' + M + '", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", '{"model": "' + M + '", "prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ("/v1/completions", {"model": M, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": M, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": M, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": M, "prompt": "hi", "n": 9}, 400, "n"),  # more than --max-batch 8
    ("/v1/completions", {"model": M, "prompt": LONG}, 400, "prompt"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens"),
    ("/execute", {"prompt": "hi", "max_tokens": 4}, 422, "job_id"),
    ("/execute", {"job_id": "v1", "prompt": "hi", "max_tokens": 4, "temperature": 2.5}, 422, "temperature"),
    ("/execute", {"job_id": "v2", "prompt": LONG, "max_tokens": 4}, 413, "prompt"),
    ("/execute", {"job_id": "v3", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
    ("/cancel", {}, 422, "job_id"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,field", CASES, ids=[f"{c[0]}:{c[3]}:{c[2]}" for c in CASES])
def test_validation_errors_name_the_field(http, path, body, status, field):
    if isinstance(body, str):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in r.text
    if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["param"] == field and (field in err["message"] or field == "body")
        assert err["type"] == "invalid_request_error"
        if "LONG" in str(body) or (isinstance(body, dict) and LONG in json.dumps(body)):
            assert err["code"] == CLE
        if status == 404:
            assert err["code"] == "model_not_found"
    else:
        assert err["field"] == field and field in err["message"] or field == "body"
        assert err["code"]


def test_openai_client_raises_bad_request_with_param(server):
    import openai

    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=M, messages=[{"role": "user", "content": LONG}])
    assert e.value.code == CLE and e.value.param == "messages" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=M, messages=[{"role": "user", "content": "hi"}], logit_bias={"a": -100})
    assert e.value.param == "logit_bias" and e.value.code == "invalid_value"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_model_may_be_omitted_and_aliases_are_listed(http, server):
    names = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert names[0] == M and server.worker.served_names == names and len(names) == 2  # + general.name
    import openai

    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    assert [client.models.retrieve(n).id for n in names] == names
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    for model in [None, *names, M + ".gguf"]:
        body = {"prompt": "1, 2, 3,", "max_tokens": 2, "temperature": 0} | ({"model": model} if model else {})
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["model"] == (model or M), r.text


def test_unknown_route_is_json_404(http):
    r = http.get("/no/such/path")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


# -- schemathesis against the app's own OpenAPI schema ---------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(model):
    """A second worker on the same weights with tiny limits, so generated requests stay cheap."""
    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=128, max_batch=2, max_tokens_out=4, max_waiting=16)
    with LiveServer(model, cfg) as s:
        yield s


def test_schemathesis_no_server_errors(fuzz_server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(fuzz_server.uri + "/openapi.json").exclude(path="/shutdown")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    failures = []
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for result, mode in itertools.product(list(schema.get_all_operations()), modes):
        op = result.ok()

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=int(os.environ.get("SCHEMATHESIS_EXAMPLES", "20")), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(base_url=fuzz_server.uri, checks=checks, timeout=60)

        try:
            check()
        except Unsatisfiable:  # no invalid input exists (an operation without parameters)
            pass
        except Exception as e:  # collect every operation's failure, then report them together
            failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {e}")
    assert not failures, "\n\n".join(failures)


# -- the CLI: ready callback, /ready before it, SIGTERM drain --------------------------------------

class FakeOrchestrator(ThreadingHTTPServer):
    """Records the ready callback and, before answering it, what the worker's /ready says."""

    def __init__(self):
        self.calls: list[dict] = []
        self.ready_during_callback: int | None = None
        self.got = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append({"path": self.path, **body})
                outer.ready_during_callback = httpx.get(body["uri"] + "/ready").status_code
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                outer.got.set()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_cli_serve_callback_and_sigterm_drain(smollm2_path, tmp_path):
    orch = FakeOrchestrator()
    threading.Thread(target=orch.serve_forever, daemon=True).start()
    cmd = [sys.executable, "-m", "worker_orcd.cli", "serve", "--port", "0", "--device", "cpu", "--ctx", "256",
           "--max-batch", "2", "--worker-id", "w-test", "--callback-url", f"http://127.0.0.1:{orch.server_port}"]
    stderr = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert orch.got.wait(120), "no ready callback"
        call = orch.calls[0]
        assert call["path"] == "/v2/internal/workers/ready"
        assert call["worker_id"] == "w-test" and call["model_ref"] == "SmolLM2-135M-Instruct.Q4_1"
        assert orch.ready_during_callback == 503, "/ready answered 200 before the callback completed"
        uri = call["uri"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", uri)
        wait_for(lambda: httpx.get(uri + "/ready").status_code == 200, "/ready to answer 200")
        health = httpx.get(uri + "/health").json()
        assert call["vram_bytes"] == health["vram_bytes"]
        # weights as stored + the KV cache, plus the small tables a model derives (RoPE frequencies)
        assert 0 <= health["vram_bytes"] - expected_cpu_bytes(smollm2_path, ctx=256, slots=2) <= 4096
        out_line = proc.stdout.readline() + proc.stdout.readline()
        assert uri in out_line and "curl" in out_line

        # SIGTERM while a stream runs: it finishes, new work is refused, the process exits 0
        body = {"job_id": "drain", "prompt": "Once upon a time", "max_tokens": 30, "temperature": 0.0}
        with httpx.stream("POST", uri + "/execute", json=body, timeout=60) as resp:
            events = sse_events(resp)
            assert next(events)[0] == "started"
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(uri + "/health").json()["status"] == "draining", "the worker to drain")
            refused = httpx.post(uri + "/execute", json={**body, "job_id": "late"})
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            assert [n for n, _ in events][-1] == "end"
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        orch.shutdown()
        stderr.close()


def expected_cpu_bytes(path, ctx: int, slots: int) -> int:
    """Weights as stored in the GGUF plus a float32 KV cache of slots x ctx positions."""
    from worker_orcd.gguf import open_gguf
    from worker_orcd.models.registry import config_for

    with open_gguf(path) as f:
        weights = sum(t.nbytes for t in f.tensors.values())
        c = config_for(f)
    return weights + c.n_layers * 2 * slots * c.n_kv_heads * ctx * c.head_dim * 4


def test_sse_lines_survive_clients_that_split_on_unicode_line_breaks():
    """A token's text holding U+2028, U+2029 or NEL stays inside its `data:` line for str.splitlines clients."""
    from worker_orcd.server.sse import data, event

    text = "a\u2028b\x85c\u2029d\ne"
    for frame in (event("token", {"t": text, "i": 0}), data({"t": text})):
        payload = [line for line in frame.splitlines() if line.startswith("data: ")]
        assert len(payload) == 1 and json.loads(payload[0][6:])["t"] == text


def test_kv_pool_on_cuda_takes_what_the_weights_leave(monkeypatch):
    """--gpu-memory-utilization: the pool gets the card's share minus what is held and the workspace, never
    less than max_batch sequences of ctx (plus the graphs' scratch slot); --kv-cache-size-mb and CPU keep
    slots x ctx."""
    from worker_orcd.server.worker import pool_blocks

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * gib)
    per_token = 48 * 2**10  # GPT-OSS-20B: 24 layers x 2 x 8 heads x 64 x bf16
    cuda = torch.device("cuda")
    blocks = pool_blocks(per_token, 4096, 64, ServeConfig(), cuda, lambda: 2 * gib)
    assert blocks == int(140 * gib * 0.9 - 12 * gib - 2 * gib) // (per_token * 16)  # 1,447,936 tokens
    assert blocks * 16 >= 65 * 4096
    small = pool_blocks(per_token, 4096, 64, ServeConfig(gpu_memory_utilization=0.1), cuda, lambda: 2 * gib)
    assert small == 65 * 4096 // 16  # the floor: what the start-up check promised
    assert pool_blocks(per_token, 4096, 64, ServeConfig(kv_cache_size_mb=100), cuda, lambda: 0) is None
    assert pool_blocks(per_token, 4096, 64, ServeConfig(), torch.device("cpu"), lambda: 0) is None
