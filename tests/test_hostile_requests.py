"""Hostile requests (issue 9): each gets its 4xx (or is cut off), and a normal greedy request right after
still succeeds with the same text. One server with small limits (256 KiB bodies, 1 s read deadlines)."""

from __future__ import annotations

import json
import re
import selectors
import socket
import time

import httpx
import pytest

from tests.server_helpers import LiveServer
from tests.waiting import wait_for
from worker_orcd.server import ServeConfig

M = "SmolLM2-135M-Instruct.Q4_1"
MAX_BODY = 256 * 1024  # room for 100,000 nesting levels
READ_TIMEOUT = 1.0
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
NORMAL = {"model": M, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    import worker_orcd

    model = worker_orcd.load(device="cpu")
    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=256, max_batch=8, max_waiting=128, max_tokens_out=200,
                      max_body_bytes=MAX_BODY, read_timeout_sec=READ_TIMEOUT)
    with LiveServer(model, cfg) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.uri, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(http) -> str:
    r = http.post("/v1/completions", json=NORMAL)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture
def still_serving(http, expected):
    """Call after the hostile request: a normal greedy request succeeds with the text it gave before."""

    def check() -> None:
        r = http.post("/v1/completions", json=NORMAL)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected

    return check


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


def assert_error(r: httpx.Response, status: int, field: str | None = None, code: str | None = None) -> dict:
    """The worker API's shape {code, message, field}; on the OpenAI API, OpenAI's {message, type, param, code}
    with 400 for every invalid request, and the openai client raises the matching class with param set."""
    openai_api = is_openai(r.request.url.path)
    if openai_api and code == "PROMPT_TOO_LONG":
        status = 400  # context_length_exceeded, as OpenAI answers
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] and err["message"] and "Traceback" not in r.text
    if openai_api:
        assert set(err) == {"message", "type", "param", "code"}, err
        if code is not None:
            assert err["code"] == OPENAI_CODES.get(code, code.lower()), err
        if field is not None:
            assert err["param"] == field and (field in err["message"] or field == "body"), err
        assert_openai_client_raises(r, field)
        return {**err, "field": err["param"]}
    if code is not None:
        assert err["code"] == code
    if field is not None:
        assert err["field"] == field and (field in err["message"] or field == "body"), err
    return err


OPENAI_CODES = {"PROMPT_TOO_LONG": "context_length_exceeded", "INVALID_REQUEST": "invalid_value"}


def assert_openai_client_raises(r: httpx.Response, field: str | None) -> None:
    """What the openai client makes of this response: BadRequestError (for a 400) with param and code."""
    import openai

    client = openai.OpenAI(base_url="http://unused/v1", api_key="unused")
    err = client._make_status_error_from_response(r)
    if r.status_code == 400:
        assert isinstance(err, openai.BadRequestError), type(err)
    assert err.param == field and err.code == r.json()["error"]["code"] and err.type == r.json()["error"]["type"]


def post_raw(http: httpx.Client, path: str, content: bytes | str, content_type: str | None = "application/json"):
    headers = {"Content-Type": content_type} if content_type else {}
    return http.post(path, content=content, headers=headers)


def with_model(rest: str) -> str:
    return '{"model": "' + M + '", ' + rest + "}"


# -- raw sockets, for what an HTTP client library would not send ----------------------------------

def connect(server) -> socket.socket:
    host, port = server.uri.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Status, headers and body of one response on a connection the server then closes."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(ln.lower().split(": ", 1) for ln in lines[1:])
    return int(lines[0].split()[1]), headers, body


def request_head(path: str, length: int | None = None, chunked: bool = False) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n"
    return (head + "\r\n").encode()


# -- oversized bodies ------------------------------------------------------------------------------

def test_body_over_limit_by_content_length_is_413_unread(server, still_serving):
    sock = connect(server)
    sock.sendall(request_head("/v1/completions", length=100 * 2**20) + b'{"model": "' + b"x" * 1000)
    status, headers, body = read_response(sock)
    assert status == 413 and headers["connection"] == "close"
    err = json.loads(body)["error"]
    assert err["code"] == "payload_too_large" and err["param"] == "body" and str(MAX_BODY) in err["message"]
    still_serving()


def test_client_that_sends_all_of_a_big_body_reads_the_413(http, still_serving):
    # the server answers at once and lingers, discarding the rest: no reset wipes the answer (httpx reads late)
    for size in [2 * MAX_BODY, 32 * MAX_BODY]:
        assert_error(post_raw(http, "/v1/completions", b"x" * size), 413, "body", "PAYLOAD_TOO_LARGE")
    still_serving()


def test_chunked_body_over_limit_is_413(server, still_serving):
    sock = connect(server)
    sock.sendall(request_head("/v1/completions", chunked=True))
    chunk = b"x" * 16384
    sent = 0
    with pytest.raises(OSError):  # the server answers and closes once the count passes the limit
        while sent < 100 * MAX_BODY:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            sock.settimeout(0.05)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    raise OSError("answered")
            except TimeoutError:
                pass
    status, headers, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert sent <= MAX_BODY + len(chunk) * 4
    still_serving()


def test_body_under_limit_is_read(http, still_serving):
    r = http.post("/tokenize", json={"prompt": "word " * 2000})
    assert r.status_code == 200 and r.json()["count"] > 2000
    assert_error(http.post("/tokenize", json={"prompt": "word " * (MAX_BODY // 5)}), 413, "body", "PAYLOAD_TOO_LARGE")
    still_serving()


@pytest.mark.parametrize("path,body,field", [
    ("/tokenize", {"prompt": "word " * (MAX_BODY // 6)}, "prompt"),
    ("/execute", {"job_id": "long", "prompt": "word " * (MAX_BODY // 6)}, "prompt"),
    ("/v1/completions", {"model": M, "prompt": "word " * (MAX_BODY // 6)}, "prompt"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "word " * (MAX_BODY // 6)}]},
     "messages"),
])
def test_prompt_far_over_the_context_is_413_untokenized(http, still_serving, path, body, field):
    # tokenizing holds the GIL (~1.4 s a MiB), stalling every stream: refused from its byte count alone
    err = assert_error(http.post(path, json=body), 413, field, "PROMPT_TOO_LONG")
    assert "bytes, so at least" in err["message"]
    still_serving()


# -- slow clients ----------------------------------------------------------------------------------

def trickle(sock: socket.socket, data: bytes, every_s: float, until_s: float) -> float:
    """Send one byte every `every_s` until the server closes or answers; seconds until it did."""
    t0 = time.monotonic()
    for b in data:
        if time.monotonic() - t0 > until_s:
            break
        try:
            sock.sendall(bytes([b]))
        except OSError:
            break
        sock.settimeout(every_s)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break
        except TimeoutError:
            pass
    return time.monotonic() - t0


def test_slow_headers_get_408_and_others_are_served(server, still_serving):
    sock = connect(server)
    head = request_head("/v1/completions", length=10)[:-2] + b"X-Padding: " + b"a" * 200 + b"\r\n\r\n"
    sock.sendall(head[:20])
    still_serving()  # while the slow head is in progress
    waited = trickle(sock, head[20:], every_s=0.2, until_s=10 * READ_TIMEOUT)
    status, headers, body = read_response(sock)
    assert status == 408 and json.loads(body)["error"]["code"] == "REQUEST_TIMEOUT"
    assert waited < 3 * READ_TIMEOUT
    still_serving()


def test_slow_body_gets_408(server, still_serving):
    body = json.dumps(NORMAL).encode()
    sock = connect(server)
    sock.sendall(request_head("/v1/completions", length=len(body)) + body[:5])
    waited = trickle(sock, body[5:], every_s=0.2, until_s=10 * READ_TIMEOUT)
    status, headers, resp = read_response(sock)
    err = json.loads(resp)["error"]
    assert status == 408 and err["code"] == "request_timeout" and headers["connection"] == "close"
    assert waited < 3 * READ_TIMEOUT
    still_serving()


def test_connection_that_sends_nothing_is_closed(server, still_serving):
    sock = connect(server)
    t0 = time.monotonic()
    sock.settimeout(10 * READ_TIMEOUT)
    assert sock.recv(1) == b""  # closed without an answer: nothing was asked
    assert time.monotonic() - t0 < 3 * READ_TIMEOUT
    still_serving()


def test_malformed_http_and_huge_headers_are_json_400(server, still_serving):
    # h11 refuses a head still incomplete past 16 KiB (one that arrives whole in a single read may be larger)
    for raw in [b"NONSENSE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n"]:
        sock = connect(server)
        try:
            sock.sendall(raw)
        except OSError:  # refused before all of it was sent
            pass
        status, _, body = read_response(sock)
        assert status == 400 and json.loads(body)["error"]["code"] == "INVALID_REQUEST"
    still_serving()


# -- stop strings ----------------------------------------------------------------------------------

LONG_STOP = " stop" * 10000  # 10,000 tokens


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"model": M, "prompt": "hi", "stop": LONG_STOP}, "stop"),
    ("/v1/completions", {"model": M, "prompt": "hi", "stop": ["\n", LONG_STOP]}, "stop"),
    ("/v1/completions", {"model": M, "prompt": "hi", "stop": [str(i) for i in range(1000)]}, "stop"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "hi"}], "stop": [LONG_STOP]},
     "stop"),
    ("/execute", {"job_id": "stop", "prompt": "hi", "stop": [LONG_STOP]}, "stop[0]"),  # a list only: exact index
    ("/execute", {"job_id": "stop", "prompt": "hi", "stop": ["a"] * 17}, "stop"),
], ids=["completions-str", "completions-list", "completions-1000", "chat", "execute", "execute-17"])
def test_huge_stop_strings_are_refused_naming_stop(http, still_serving, path, body, field):
    assert_error(http.post(path, json=body), 400 if is_openai(path) else 422, field)
    still_serving()


def test_largest_allowed_stop_list_keeps_text_and_speed(http, expected, still_serving):
    stops = ["The capital" + "a" * 500 + chr(65 + i) for i in range(16)]  # 16 x 512 chars; never completed
    r = http.post("/v1/completions", json={**NORMAL, "stop": stops})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    still_serving()


class CountingStr(str):
    """A stop string that counts the characters read from it (the matcher's comparisons)."""

    reads = 0

    def __getitem__(self, i):
        CountingStr.reads += 1
        return str.__getitem__(self, i)


def test_stop_matching_is_linear():
    from worker_orcd.engine.stop import StopMatcher

    # each stop's longest partial match is held: the old matcher rescanned every prefix of every stop per token
    stops = [CountingStr("c" + "a" * 510 + chr(100 + i)) for i in range(15)] + [CountingStr("a" * 511 + "b")]
    m = StopMatcher(stops)
    CountingStr.reads = 0
    n = 2000
    out = "".join(m.push("a") for _ in range(n))
    # KMP: amortized <= 2 comparisons per character per stop (measured 1.1); rescanning prefixes costs ~500
    assert 0 < CountingStr.reads <= 3 * n * len(stops), f"{CountingStr.reads} reads of the stop strings"
    assert out == "a" * (n - 511) and m.pending == "a" * 511 and not m.stopped
    assert m.push("b") == "" and m.stopped


# -- malformed JSON --------------------------------------------------------------------------------

@pytest.mark.parametrize("body,field,what", [
    ("[" * 100000, "body", "nested too deeply"),
    ('{"model": "' + M + '", "prompt": ' + "[" * 100000 + "]" * 100000 + "}", "body", "nested too deeply"),
    ('{"model": "' + M + '", "prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", "body", "too long"),
    ('{"model": "' + M + '", "prompt": "hi", "prompt": "bye"}', "body", "'prompt' appears twice"),
    ('{"model": "' + M + '", "prompt": "hi"', "body", "malformed JSON"),
    ('{"model": "' + M + '", "prompt": "hi"}garbage', "body", "malformed JSON"),
], ids=["nested-100k", "nested-in-field", "5000-digit-int", "duplicate-key", "truncated", "trailing"])
def test_malformed_json_is_400(http, still_serving, body, field, what):
    for path in ["/v1/completions", "/v1/chat/completions", "/execute", "/tokenize"]:
        err = assert_error(post_raw(http, path, body), 400, field, "INVALID_REQUEST")
        assert what in err["message"], err
    still_serving()


@pytest.mark.parametrize("change,status,field", [
    ({"max_tokens": 10**40}, 400, "max_tokens"),
    ('"max_tokens": 1e400', 400, "max_tokens"),  # json reads 1e400 as inf; not an integer
    ('"temperature": -1e400', 400, "temperature"),
    ({"seed": 2**70}, 400, "seed"),
    ({"temperature": 1e308}, 400, "temperature"),
    ({"top_k": 10**30}, 200, None),  # above the vocabulary: every token stays, as top_k=0
    ({"n": 10**6}, 400, "n"),
    ({"logprobs": 21}, 400, "logprobs"),
    ({"logprobs": 5, "echo": True}, 200, None),
    ({"best_of": 2}, 400, "best_of"),
    ({"logit_bias": {str(10**9): 1}}, 400, "logit_bias"),
    ({"stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
])
def test_huge_and_unsupported_fields(http, still_serving, change, status, field):
    if isinstance(change, str):  # JSON that json.dumps would not write
        r = post_raw(http, "/v1/completions", with_model('"prompt": "hi", ' + change))
    else:
        r = http.post("/v1/completions", json={**NORMAL, **change})
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status, field)
    still_serving()


def test_chat_unsupported_fields(http, still_serving):
    chat = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert_error(http.post("/v1/chat/completions", json={**chat, "top_logprobs": 3}), 400, "top_logprobs")
    assert_error(http.post("/v1/chat/completions", json={**chat, "n": 10**6}), 400, "n")
    assert_error(http.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 10**12}), 400,
                 "max_completion_tokens")
    still_serving()


@pytest.mark.parametrize("change,field,code", [
    ({"frequency_penalty": 2.5}, "frequency_penalty", "invalid_value"),
    ({"presence_penalty": -3}, "presence_penalty", "invalid_value"),
    ({"logit_bias": {"x1": -100}}, "logit_bias", "invalid_value"),
    ({"top_logprobs": 3}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    ({"min_p": 1.5}, "min_p", "invalid_value"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_parameter"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"mirostat_tau": 5}, "mirostat_tau", "unknown_parameter"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "messages[0].weight", "unknown_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name",
     "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "tools[0].function.strict",
     "unsupported_parameter"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", "invalid_value"),
])
def test_fields_not_implemented_are_refused_by_name(http, still_serving, change, field, code):
    chat = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    err = assert_error(http.post("/v1/chat/completions", json={**chat, **change}), 400, field)
    assert err["code"] == code, err
    still_serving()


def test_no_op_values_of_unimplemented_fields_pass(http, still_serving):
    chat = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    noops = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "logprobs": False,
             "response_format": {"type": "text"}, "store": False, "modalities": ["text"], "metadata": {"a": "b"},
             "parallel_tool_calls": True, "user": "u1"}
    r = http.post("/v1/chat/completions", json={**chat, **noops})
    assert r.status_code == 200, r.text
    still_serving()


# -- text that is not Unicode ----------------------------------------------------------------------

BAD_UTF8 = [
    b'{"model": "' + M.encode() + b'", "prompt": "caf\xc3"}',  # truncated sequence
    b'{"model": "' + M.encode() + b'", "prompt": "\xff\xfe"}',  # never valid in UTF-8
    b'{"model": "' + M.encode() + b'", "prompt": "\xed\xa0\x80"}',  # an encoded surrogate (CESU-8)
    '{"model": "x"}'.encode("utf-16"),  # JSON must be UTF-8; json.loads alone would take this
]


@pytest.mark.parametrize("body", BAD_UTF8, ids=["truncated", "ff-fe", "cesu-8", "utf-16"])
def test_invalid_utf8_body_is_400(http, still_serving, body):
    for path in ["/v1/completions", "/v1/chat/completions", "/execute", "/tokenize"]:
        err = assert_error(post_raw(http, path, body), 400, "body", "INVALID_REQUEST")
        assert "UTF-8" in err["message"]
    still_serving()


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", with_model('"prompt": "a\\ud800b"'), "prompt"),
    ("/v1/completions", with_model('"prompt": "hi", "stop": ["x", "\\udfff"]'), "stop[1]"),
    ("/v1/chat/completions", with_model('"messages": [{"role": "user", "content": "\\ud83d"}]'),
     "messages[0].content"),
    ("/execute", '{"job_id": "s", "prompt": "\\ud800"}', "prompt"),
    ("/execute", '{"job_id": "\\udc00", "prompt": "hi"}', "job_id"),
    ("/tokenize", '{"prompt": "x\\udbff"}', "prompt"),
])
def test_lone_surrogates_are_400_naming_the_field(http, still_serving, path, body, field):
    err = assert_error(post_raw(http, path, body), 400, field, "INVALID_REQUEST")
    assert "surrogate" in err["message"]
    still_serving()


def test_surrogate_pairs_and_nul_are_text(http, still_serving):
    r = post_raw(http, "/tokenize", '{"prompt": "\\ud83d\\ude00 a\\u0000b"}')
    assert r.status_code == 200 and r.json()["count"] > 2
    still_serving()


# -- not JSON at all -------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None,
                                          "application/json; charset=latin-1", "multipart/form-data; boundary=x"])
def test_body_that_is_not_json_is_415(http, still_serving, content_type):
    r = post_raw(http, "/v1/completions", json.dumps(NORMAL), content_type)
    assert_error(r, 415, "Content-Type", "UNSUPPORTED_MEDIA_TYPE")
    still_serving()


def test_json_under_a_json_subtype_is_accepted(http, expected):
    for ct in ["application/json; charset=utf-8", "application/vnd.api+json", "APPLICATION/JSON"]:
        r = post_raw(http, "/v1/completions", json.dumps(NORMAL), ct)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected, (ct, r.text)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/execute", "/tokenize", "/cancel"])
def test_empty_body_is_400(http, still_serving, path):
    assert_error(post_raw(http, path, b"", None), 400, "body")
    assert_error(post_raw(http, path, b""), 400, "body")
    still_serving()


# -- a client that opens 100 streams and leaves ----------------------------------------------------

def gauges(http: httpx.Client) -> dict[str, float]:
    """Unlabelled samples by name, and worker_requests_total by outcome."""
    text = http.get("/metrics").text
    out = {name: float(v) for name, v in re.findall(r"^(worker_\w+) (\S+)$", text, re.M)}
    out |= {k: float(v) for k, v in re.findall(r'^worker_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}
    return out


def stream_request(i: int) -> bytes:
    """Four kinds of stream, short prompts: a prompt chunk rides along with the batch's decode step."""
    kind = i // 4 % 4
    if kind < 2:
        path, body = "/execute", {"job_id": f"flood-{i}", "prompt": "1, 2,", "max_tokens": 200}
    else:
        body = {"model": M, "max_tokens": 200, "stream": True, "temperature": 0}
        if kind == 2:
            path, body = "/v1/completions", {**body, "prompt": "1, 2,"}
        else:
            path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "Count"}]}
    data = json.dumps(body).encode()
    return request_head(path, length=len(data)) + data


FIRST_TOKEN = [b"event: token", b"event: token", b'"text": "', b'"delta": {"content": "']


def test_hundred_streams_dropped_free_everything(server, http, still_serving):
    before = gauges(http)
    socks = [connect(server) for _ in range(100)]
    for i, sock in enumerate(socks):
        sock.sendall(stream_request(i))
    # half leave before their first token (before any answer, or after the response head), half after it
    leave = {i: ("now", "token", "head", "token")[i % 4] for i in range(100)}
    sel = selectors.DefaultSelector()
    seen: dict[int, bytes] = {}
    for i, sock in enumerate(socks):
        if leave[i] == "now":
            sock.close()
        else:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, i)
            seen[i] = b""
    deadline = time.monotonic() + 600  # a deadline for a hang only: 75 first tokens through 8 slots on a busy machine
    while seen and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            i, sock = key.data, key.fileobj
            seen[i] += sock.recv(65536)
            assert seen[i].startswith(b"HTTP/1.1 200"), seen[i][:200]
            if b"\r\n\r\n" in seen[i] and (leave[i] == "head" or FIRST_TOKEN[i // 4 % 4] in seen[i]):
                sel.unregister(sock)
                sock.close()
                del seen[i]
    assert not seen, f"{len(seen)} streams never reached their point of leaving"
    def drained() -> bool:
        nonlocal g
        g = gauges(http)
        return g["worker_running_sequences"] == g["worker_waiting_sequences"] == g["worker_kv_cache_used_tokens"] == 0

    g: dict[str, float] = {}
    wait_for(drained, "every dropped stream to leave the scheduler")
    assert g["worker_running_sequences"] == g["worker_waiting_sequences"] == 0, g
    assert g["worker_kv_cache_used_tokens"] == 0 and server.worker.scheduler.idle
    assert not any(server.worker.scheduler.active(f"flood-{i}") for i in range(100))
    # every stream that reached the scheduler is counted once it is gone (some that left at once never did)
    assert g.get("cancelled", 0) - before.get("cancelled", 0) >= 75
    still_serving()
