"""Soak: N concurrent streams against `worker-orcd serve` for a fixed time, with random cancels and
disconnects; then every finished stream is replayed and must give the same text.

Usage: python bench/soak.py [--streams 16] [--duration 600] [--url URL | --model PATH --device cpu]
                            [--replay N] [--json PATH] [--server-arg=--max-batch=8 ...]

Without --url it starts `worker-orcd serve` in its own process on a free loopback port (its log goes to
--server-log) and stops it with SIGTERM at the end, which must exit 0. Each stream loops: a random
request (/execute or /v1/completions with stream, random prompt, seed, temperature 0 or > 0, top-p/top-k,
max_tokens, sometimes stop strings), read to the end, or closed mid-stream (--disconnect-frac), or
cancelled through POST /cancel (--cancel-frac). Bounded: --max-requests in all, --request-timeout each.
Every stream's protocol is checked (event order, token indices, one terminal event, counts).

Replay: the finished streams (all, or --replay N of them) run again with the same request after the
soak, --replay-concurrency at a time (batching does not change a sequence's tokens, so company is
allowed); text, token count and finish reason must be equal. A stream cut short (cancel, disconnect)
must be a prefix of its replay. RSS (VmRSS of the server) is read when idle after a warm-up and after
the soak; VRAM from /health on a GPU.

Exits 1 on any 5xx, protocol or transport error, error event other than CANCELLED, replay mismatch,
traceback in the server log, unclean drain, or RSS growth >= --rss-limit (5%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "The history of the printing press",
    "Photosynthesis is the process by which",
    "My favourite recipe for bread is",
    "The tallest mountains in the world",
    "In computer science, a hash table",
    "The rules of chess say that",
    "A short poem about autumn:",
    "The French Revolution began when",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to French: The cat sleeps on the warm windowsill.",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Unicode check: naïve café, Größe, 日本語のテキスト, emoji 🙂🚀, and math ∑∫√.",
    "Write a haiku about the sea.",
    "<|im_start|>user\nWhat is a GGUF file?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
    "List three prime numbers:",
    "The quick brown fox",
    # longer than one prefill chunk (256 tokens): exercises chunked prefill beside running decodes
    " ".join(["The committee met on Tuesday to discuss the budget, the schedule and the new building."] * 24),
    " ".join(["In the morning the market opens early and the traders shout their prices across the square."] * 8),
]
TEMPERATURES = [0.0, 0.0, 0.0, 0.5, 0.8, 1.0, 1.5]
STOPS = [["\n"], ["."], [" the"], ["\n\n", "!"], [","]]
OUTCOMES_OK = {"completed", "cancelled", "cancel_late", "disconnected"}


@dataclass
class Spec:
    """One request and what the client does with it."""

    kind: str  # "execute" | "completion"
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str] | None
    action: str = "complete"  # "complete" | "cancel" | "disconnect"
    after: int = 0  # tokens received before the cancel / disconnect

    def request(self, job_id: str, model: str) -> tuple[str, dict]:
        common = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}
        if self.stop:
            common["stop"] = self.stop
        if self.kind == "execute":
            return "/execute", {"job_id": job_id, **common}
        return "/v1/completions", {"model": model, "stream": True, "stream_options": {"include_usage": True},
                                   **common}


@dataclass
class Result:
    spec: Spec
    outcome: str = "pending"
    status: int | None = None
    text: str = ""
    token_events: int = 0
    tokens: int | None = None  # the server's count (end.tokens_out or usage.completion_tokens)
    finish: str | None = None
    error: str | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    cancel_s: float | None = None  # /cancel sent -> the stream's last event
    busy_retries: int = 0


def random_spec(rng: random.Random, max_tokens: int, cancel_frac: float, disconnect_frac: float) -> Spec:
    n = rng.choice([1, 2, 3]) if rng.random() < 0.1 else rng.randint(4, max_tokens)
    r = rng.random()
    action = "cancel" if r < cancel_frac else "disconnect" if r < cancel_frac + disconnect_frac else "complete"
    return Spec(kind=rng.choice(["execute", "completion"]), prompt=rng.choice(PROMPTS), max_tokens=n,
                temperature=rng.choice(TEMPERATURES), top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
                top_k=rng.choice([0, 0, 40]), seed=rng.randrange(2**31),
                stop=rng.choice(STOPS) if rng.random() < 0.15 else None, action=action,
                after=rng.randrange(n))


class ProtocolError(Exception):
    pass


class ServerError(Exception):
    """A 5xx answer to a request made while streaming (/cancel)."""


# -- one stream ------------------------------------------------------------------------------------

async def sse_messages(resp: httpx.Response):
    """(event name or None, parsed data) per SSE message."""
    name, data = None, []
    async for line in resp.aiter_lines():
        if line == "":
            if data:
                raw = "\n".join(data)
                yield name, raw if raw == "[DONE]" else json.loads(raw)
            name, data = None, []
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif not line.startswith(":"):
            raise ProtocolError(f"not an SSE line: {line[:80]!r}")
    if data:
        raise ProtocolError("the stream ended inside an SSE message")


class StreamReader:
    """Checks one stream's protocol as it arrives and collects its text and timings."""

    def __init__(self, result: Result, job_id: str, sent: float):
        self.r = result
        self.job_id = job_id
        self.sent = sent
        self.last_token_at: float | None = None
        self.last_index = -1
        self.terminal: str | None = None  # "end" | "error"
        self.server_id: str | None = None  # completions: the id /cancel takes
        self.started = False  # execute: the started event came
        self.done = False  # completions: [DONE] came

    def token(self, text: str) -> None:
        now = time.monotonic()
        if not isinstance(text, str) or not text:
            raise ProtocolError(f"token event without text: {text!r}")
        if self.r.ttft_s is None:
            self.r.ttft_s = now - self.sent
        else:
            self.r.gaps_s.append(now - self.last_token_at)
        self.last_token_at = now
        self.r.text += text
        self.r.token_events += 1

    def execute(self, name: str | None, data) -> None:
        if self.terminal is not None:
            raise ProtocolError(f"event {name!r} after the terminal event")
        if not self.started and name != "started":
            raise ProtocolError(f"first event is {name!r}, not started")
        if name == "started":
            if self.started or data.get("job_id") != self.job_id:
                raise ProtocolError(f"bad started event {data}")
            self.started = True
        elif name == "token":
            if data["i"] <= self.last_index:
                raise ProtocolError(f"token index {data['i']} after {self.last_index} (duplicate or reordered)")
            self.last_index = data["i"]
            self.token(data["t"])
        elif name == "metrics":
            pass
        elif name == "end":
            self.terminal = "end"
            self.r.tokens, self.r.finish = data["tokens_out"], data["stop_reason"]
            self.check_count()
        elif name == "error":
            self.terminal = "error"
            self.r.error = data["code"]
        else:
            raise ProtocolError(f"unknown event {name!r}")

    def completion(self, name: str | None, data) -> None:
        if name is not None:
            raise ProtocolError(f"named event {name!r} in an OpenAI stream")
        if data == "[DONE]":
            if self.terminal is None:
                raise ProtocolError("[DONE] before a finish_reason or an error")
            self.done = True
            return
        if self.done:
            raise ProtocolError("data after [DONE]")
        if "error" in data:
            if self.terminal is not None:
                raise ProtocolError("an error after the terminal chunk")
            self.terminal = "error"
            err = data["error"]
            if set(err) != {"message", "type", "param", "code"}:
                raise ProtocolError(f"an error chunk not in OpenAI's shape: {err}")
            self.r.error = err["code"].upper()  # OpenAI's lower-case codes; the worker API's are upper-case
            return
        if self.server_id is None:
            self.server_id = data["id"]
        elif data["id"] != self.server_id:
            raise ProtocolError(f"chunk id changed from {self.server_id} to {data['id']}")
        if not data["choices"]:  # the usage chunk
            if self.terminal is None:
                raise ProtocolError("usage before the finish_reason or an error")
            self.r.tokens = data["usage"]["completion_tokens"]
            self.check_count()
            return
        if self.terminal is not None:
            raise ProtocolError("a choice after the finish_reason")
        choice = data["choices"][0]
        if choice["finish_reason"] is not None:
            self.terminal = "end"
            self.r.finish = choice["finish_reason"]
            if choice["text"]:
                raise ProtocolError("text in the finish chunk")
        else:
            self.token(choice["text"])

    def check_count(self) -> None:
        n, spec = self.r.tokens, self.r.spec
        if n is None:
            return
        if n < self.r.token_events or n < self.last_index + 1 or n > spec.max_tokens:
            raise ProtocolError(f"{n} tokens counted, {self.r.token_events} events, max_tokens {spec.max_tokens}")
        if self.r.finish in ("max_tokens", "length") and n != spec.max_tokens:
            raise ProtocolError(f"finished by length after {n} of {spec.max_tokens} tokens")

    def complete(self) -> bool:
        if self.r.spec.kind == "execute":
            return self.terminal is not None
        return self.done and (self.terminal == "error" or self.r.tokens is not None)


async def run_stream(client: httpx.AsyncClient, spec: Spec, job_id: str, model: str, act: bool = True) -> Result:
    """One request to its end; `act`: carry out the spec's cancel or disconnect."""
    r = Result(spec)
    path, body = spec.request(job_id, model)
    action = spec.action if act else "complete"
    while True:
        sent = time.monotonic()
        try:
            async with client.stream("POST", path, json=body) as resp:
                r.status = resp.status_code
                if resp.status_code == 429:  # full: the client backs off, as Retry-After asks
                    r.busy_retries += 1
                    await resp.aread()
                    await asyncio.sleep(min(float(resp.headers.get("retry-after", "1")), 1.0) * random.random())
                    continue
                if resp.status_code != 200:
                    r.outcome = "http_5xx" if resp.status_code >= 500 else "http_4xx"
                    r.error = (await resp.aread()).decode(errors="replace")[:300]
                    return r
                await read_stream(client, resp, r, job_id, sent, action)
                return r
        except ProtocolError as e:
            r.outcome, r.error = "protocol", str(e)
        except ServerError as e:
            r.outcome, r.error = "http_5xx", str(e)
        except httpx.TimeoutException as e:
            r.outcome, r.error = "timeout", f"{type(e).__name__}: {e}"
        except (httpx.TransportError, json.JSONDecodeError, KeyError, TypeError) as e:
            r.outcome, r.error = "transport" if isinstance(e, httpx.TransportError) else "protocol", \
                f"{type(e).__name__}: {e}"
        return r


async def read_stream(client: httpx.AsyncClient, resp: httpx.Response, r: Result, job_id: str, sent: float,
                      action: str) -> None:
    spec = r.spec
    reader = StreamReader(r, job_id, sent)
    handle = reader.execute if spec.kind == "execute" else reader.completion
    cancel_sent: float | None = None
    seen: list[str] = []  # the last messages, for the error report
    async for name, data in sse_messages(resp):
        seen = [*seen[-3:], f"{name}: {json.dumps(data, ensure_ascii=False)[:200]}"]
        try:
            handle(name, data)
        except ProtocolError as e:
            raise ProtocolError(f"{e}; last messages {seen}") from None
        acting = cancel_sent is None and reader.terminal is None and r.token_events >= spec.after
        if action == "disconnect" and acting:
            r.outcome = "disconnected"
            return  # leaving `client.stream` closes the connection mid-stream
        target = job_id if spec.kind == "execute" else reader.server_id
        if action == "cancel" and acting and target is not None:
            cancel_sent = time.monotonic()
            answer = await client.post("/cancel", json={"job_id": target})
            if answer.status_code >= 500:
                raise ServerError(f"/cancel answered {answer.status_code}: {answer.text[:200]}")
            if answer.status_code != 202:
                raise ProtocolError(f"/cancel answered {answer.status_code}: {answer.text[:200]}")
    if not reader.complete():
        raise ProtocolError("the stream closed before its terminal event")
    if cancel_sent is not None:
        r.cancel_s = time.monotonic() - cancel_sent
    if reader.terminal == "end":
        r.outcome = "cancel_late" if cancel_sent is not None else "completed"
    elif r.error == "CANCELLED" and cancel_sent is not None:
        r.outcome = "cancelled"
    else:
        r.outcome = "error_event"


# -- the server ------------------------------------------------------------------------------------

class Server:
    """`worker-orcd serve` in its own process on a free loopback port."""

    def __init__(self, model: str | None, device: str, args: list[str], log_path: Path):
        cmd = [sys.executable, "-m", "worker_orcd.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--device", device, *args]
        if model:
            cmd += ["--model", model]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()  # "ready: <model> on <device> at <uri>", or "" if it died
        if not line.startswith("ready:"):
            self.proc.kill()
            raise SystemExit(f"the server did not start ({self.proc.wait()}); see {log_path}")
        self.url = line.rsplit(" at ", 1)[1].strip()
        self.pid = self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a drain); the exit code, or None if it had to be killed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self.log.close()
        return code

    def tracebacks(self) -> int:
        return self.log_path.read_text(errors="replace").count("Traceback")


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def wait_idle(client: httpx.AsyncClient, timeout: float = 60.0) -> dict:
    """/health once nothing runs or waits (status 'ready')."""
    deadline = time.monotonic() + timeout
    while True:
        health = (await client.get("/health")).json()
        if health["status"] == "ready" or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.1)


# -- the soak --------------------------------------------------------------------------------------

@dataclass
class Config:
    streams: int = 16
    duration_s: float = 600.0
    max_requests: int = 100_000
    request_timeout_s: float = 120.0
    max_tokens: int = 64
    cancel_frac: float = 0.1
    disconnect_frac: float = 0.1
    replay: int = -1  # -1: all
    replay_concurrency: int = 16
    seed: int = 0
    rss_limit: float = 0.05
    warmup_rounds: int = 2


async def warm_up(client: httpx.AsyncClient, model: str, cfg: Config) -> None:
    """Every path once, at the longest prompt and max_tokens, with all streams at once: the allocator,
    the KV slots and the packed kernels reach their steady state before the first RSS reading."""
    longest = max(PROMPTS, key=len)
    specs = [Spec(kind=("execute", "completion")[i % 2], prompt=longest if i % 3 == 0 else PROMPTS[i % len(PROMPTS)],
                  max_tokens=cfg.max_tokens, temperature=(0.0, 0.8)[i % 2], top_p=(1.0, 0.9)[i % 2],
                  top_k=(0, 40)[i % 2], seed=i, stop=None) for i in range(cfg.streams)]
    for round_ in range(cfg.warmup_rounds):
        results = await asyncio.gather(*(run_stream(client, s, f"warm{round_}-{i}", model)
                                         for i, s in enumerate(specs)))
        bad = [r for r in results if r.outcome != "completed"]
        if bad:
            raise SystemExit(f"warm-up failed: {bad[0].outcome} {bad[0].error}")


async def soak(client: httpx.AsyncClient, model: str, cfg: Config, pid: int | None) -> tuple[list[Result], dict]:
    started = time.monotonic()
    stop_at = started + cfg.duration_s
    results: list[Result] = []
    rss_max = 0
    issued = 0

    async def stream_loop(k: int) -> None:
        nonlocal issued
        rng = random.Random(cfg.seed * 1_000_003 + k)
        n = 0
        while time.monotonic() < stop_at and issued < cfg.max_requests:
            issued += 1
            spec = random_spec(rng, cfg.max_tokens, cfg.cancel_frac, cfg.disconnect_frac)
            try:
                r = await asyncio.wait_for(run_stream(client, spec, f"soak-{k}-{n}", model), cfg.request_timeout_s)
            except asyncio.TimeoutError:
                r = Result(spec, outcome="timeout", error=f"no end within {cfg.request_timeout_s} s")
            results.append(r)
            n += 1

    async def sample_rss() -> None:
        nonlocal rss_max
        while time.monotonic() < stop_at:
            rss_max = max(rss_max, rss_bytes(pid) or 0)
            await asyncio.sleep(2.0)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(stream_loop(k) for k in range(cfg.streams)))
    elapsed = time.monotonic() - started
    sampler.cancel()
    return results, {"elapsed_s": elapsed, "rss_max": rss_max or None}


async def replay(client: httpx.AsyncClient, model: str, results: list[Result], cfg: Config) -> dict:
    """Run finished streams again with the same request; full ones must match, cut ones be a prefix."""
    full = [r for r in results if r.outcome in ("completed", "cancel_late")]
    cut = [r for r in results if r.outcome in ("cancelled", "disconnected") and r.text]
    rng = random.Random(cfg.seed)
    if 0 <= cfg.replay < len(full):
        full = rng.sample(full, cfg.replay)
        cut = rng.sample(cut, min(len(cut), cfg.replay // 4))
    sem = asyncio.Semaphore(cfg.replay_concurrency)
    mismatches: list[dict] = []
    errors: list[str] = []

    async def one(i: int, r: Result) -> None:
        async with sem:
            try:
                again = await asyncio.wait_for(run_stream(client, r.spec, f"replay-{i}", model, act=False),
                                               cfg.request_timeout_s)
            except asyncio.TimeoutError:
                errors.append(f"replay {i}: timeout")
                return
        if again.outcome != "completed":
            errors.append(f"replay {i}: {again.outcome} {again.error}")
            return
        if r.outcome in ("completed", "cancel_late"):
            same = (again.text, again.tokens, again.finish) == (r.text, r.tokens, r.finish)
        else:
            same = again.text.startswith(r.text)
        if not same:
            mismatches.append({"spec": asdict(r.spec), "outcome": r.outcome, "soak": [r.text, r.tokens, r.finish],
                               "replay": [again.text, again.tokens, again.finish]})

    started = time.monotonic()
    await asyncio.gather(*(one(i, r) for i, r in enumerate(full + cut)))
    return {"replayed_full": len(full), "replayed_cut": len(cut), "mismatches": mismatches, "errors": errors,
            "elapsed_s": time.monotonic() - started}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summarize(results: list[Result], run: dict, cfg: Config) -> dict:
    outcomes = Counter(r.outcome for r in results)
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    gaps = [g for r in results for g in r.gaps_s]
    cancel = [r.cancel_s for r in results if r.cancel_s is not None]
    tokens = sum(r.tokens if r.tokens is not None else r.token_events for r in results)
    return {
        "streams": cfg.streams, "duration_s": round(run["elapsed_s"], 1), "requests": len(results),
        "outcomes": dict(outcomes), "busy_429_retries": sum(r.busy_retries for r in results),
        "http_5xx": outcomes["http_5xx"],
        "failures": [f"{r.outcome}: {r.error}" for r in results if r.outcome not in OUTCOMES_OK][:20],
        "ttft_ms": {"p50": ms(pct(ttft, 0.5)), "p99": ms(pct(ttft, 0.99))},
        "token_latency_ms": {"p50": ms(pct(gaps, 0.5)), "p99": ms(pct(gaps, 0.99))},
        "cancel_to_end_ms": {"p50": ms(pct(cancel, 0.5)), "p99": ms(pct(cancel, 0.99)), "max": ms(max(cancel or [0]))},
        "tokens": tokens, "tokens_per_s": round(tokens / run["elapsed_s"], 1),
    }


def verdict(report: dict, cfg: Config) -> list[str]:
    """What failed the acceptance criteria (empty: passed)."""
    bad = []
    s = report["soak"]
    if s["http_5xx"]:
        bad.append(f"{s['http_5xx']} responses were 5xx")
    others = sum(n for k, n in s["outcomes"].items() if k not in OUTCOMES_OK)
    if others:
        bad.append(f"{others} streams failed: {s['failures'][:3]}")
    if not s["outcomes"].get("completed"):
        bad.append("no stream completed")
    rep = report["replay"]
    if rep["mismatches"]:
        bad.append(f"{len(rep['mismatches'])} replays differ from the soak")
    if rep["errors"]:
        bad.append(f"{len(rep['errors'])} replays failed: {rep['errors'][:3]}")
    growth = report["memory"].get("rss_growth")
    if growth is not None and growth >= cfg.rss_limit:
        bad.append(f"RSS grew {growth:.1%} (limit {cfg.rss_limit:.0%})")
    if report["server"].get("tracebacks"):
        bad.append(f"{report['server']['tracebacks']} tracebacks in the server log")
    if report["server"].get("exit_code") not in (0, "not started here"):
        bad.append(f"SIGTERM drain exit code {report['server'].get('exit_code')}")
    return bad


def mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def table(report: dict) -> str:
    s, m, rep = report["soak"], report["memory"], report["replay"]
    rows = [
        ("streams x duration", f"{s['streams']} x {s['duration_s']} s ({report['server']['device']})"),
        ("requests", f"{s['requests']}: " + ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items()))),
        ("429 retries (busy)", str(s["busy_429_retries"])),
        ("5xx", str(s["http_5xx"])),
        ("TTFT p50 / p99", f"{s['ttft_ms']['p50']} / {s['ttft_ms']['p99']} ms"),
        ("per-token p50 / p99", f"{s['token_latency_ms']['p50']} / {s['token_latency_ms']['p99']} ms"),
        ("cancel -> end p50 / p99", f"{s['cancel_to_end_ms']['p50']} / {s['cancel_to_end_ms']['p99']} ms"),
        ("tokens, tokens/s", f"{s['tokens']}, {s['tokens_per_s']}"),
        ("replayed (full + cut)", f"{rep['replayed_full']} + {rep['replayed_cut']} in {rep['elapsed_s']:.0f} s"),
        ("replay mismatches", f"{len(rep['mismatches'])} (errors {len(rep['errors'])})"),
        ("RSS start / end / max", f"{mib(m['rss_start'])} / {mib(m['rss_end'])} / {mib(m['rss_max'])}"),
        ("RSS growth", "-" if m["rss_growth"] is None else f"{m['rss_growth']:+.2%}"),
        ("RSS after replay", mib(m["rss_after_replay"])),
        ("VRAM start / end", f"{mib(m['vram_start'])} / {mib(m['vram_end'])}"),
        ("server tracebacks, drain exit", f"{report['server'].get('tracebacks')}, {report['server'].get('exit_code')}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


async def main_async(args: argparse.Namespace, cfg: Config) -> dict:
    server = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        log = Path(args.server_log or tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
        server = Server(args.model, args.device, args.server_arg, log)
        url, pid = server.url, server.pid
        print(f"server pid {pid} at {url}, log {log}", flush=True)
    limits = httpx.Limits(max_connections=cfg.streams * 2 + 8, max_keepalive_connections=cfg.streams * 2 + 8)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    try:
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            await warm_up(client, model, cfg)
            health = await wait_idle(client)
            rss_start = rss_bytes(pid)
            vram_start = health["vram_bytes"] if health["device"].startswith("cuda") else None
            print(f"warm: RSS {mib(rss_start)}; soaking {cfg.streams} streams for {cfg.duration_s:.0f} s", flush=True)
            results, run = await soak(client, model, cfg, pid)
            health = await wait_idle(client)
            rss_end = rss_bytes(pid)
            vram_end = health["vram_bytes"] if health["device"].startswith("cuda") else None
            print(f"soak done: {len(results)} requests; replaying", flush=True)
            rep = await replay(client, model, results, cfg)
            await wait_idle(client)
            rss_after = rss_bytes(pid)
    finally:
        info: dict = {"url": url, "pid": pid, "exit_code": "not started here"}
        if server is not None:
            info["exit_code"] = server.stop()
            info["tracebacks"] = server.tracebacks()
            info["log"] = str(server.log_path)
    info["device"] = health["device"]
    info["model"] = model
    growth = None if rss_start is None or rss_end is None else (rss_end - rss_start) / rss_start
    return {
        "soak": summarize(results, run, cfg),
        "replay": rep,
        "memory": {"rss_start": rss_start, "rss_end": rss_end, "rss_max": run["rss_max"], "rss_growth": growth,
                   "rss_after_replay": rss_after, "vram_start": vram_start, "vram_end": vram_end},
        "server": info,
        "config": asdict(cfg),
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running worker (default: start `worker-orcd serve` here)")
    p.add_argument("--pid", type=int, help="the running worker's pid, for RSS (with --url)")
    p.add_argument("--model", help="GGUF file (default: the packaged model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--server-arg", action="append", default=[], help="a `serve` argument: --server-arg=--ctx=1024")
    p.add_argument("--server-log", help="where the started server's log goes (default: a temp file)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of soak (after the warm-up)")
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--cancel-frac", type=float, default=0.1)
    p.add_argument("--disconnect-frac", type=float, default=0.1)
    p.add_argument("--replay", type=int, default=-1, help="finished streams to replay (-1: all)")
    p.add_argument("--replay-concurrency", type=int, default=None, help="default: --streams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-limit", type=float, default=0.05)
    p.add_argument("--warmup-rounds", type=int, default=2, help="rounds of --streams requests before the RSS start")
    p.add_argument("--json", help="write the full report here")
    a = p.parse_args(argv)
    cfg = Config(streams=a.streams, duration_s=a.duration, max_requests=a.max_requests,
                 request_timeout_s=a.request_timeout, max_tokens=a.max_tokens, cancel_frac=a.cancel_frac,
                 disconnect_frac=a.disconnect_frac, replay=a.replay,
                 replay_concurrency=a.replay_concurrency or a.streams, seed=a.seed, rss_limit=a.rss_limit,
                 warmup_rounds=a.warmup_rounds)
    return a, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    report = asyncio.run(main_async(args, cfg))
    report["verdict"] = verdict(report, cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(table(report))
    for line in report["verdict"]:
        print(f"FAIL: {line}")
    for m in report["replay"]["mismatches"][:3]:
        print(f"  mismatch: {json.dumps(m, ensure_ascii=False)[:400]}")
    print("PASS" if not report["verdict"] else "FAIL", flush=True)
    return 1 if report["verdict"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
