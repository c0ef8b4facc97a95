"""--api-key, loopback-only /shutdown, CORS, and a busy port refused before the model loads."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest

from tests.server_helpers import LiveServer
from worker_orcd.server import ServeConfig

KEY = "s3cret-key"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def model():
    import worker_orcd

    return worker_orcd.load(device="cpu")


class KeyedServer(LiveServer):
    def __exit__(self, *exc) -> None:
        try:
            httpx.post(self.uri + "/shutdown", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        except httpx.TransportError:
            pass
        self._thread.join(40)


@pytest.fixture(scope="module")
def server(model):
    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=256, max_batch=2, api_key=KEY,
                      allowed_origins=["https://app.example"])
    with KeyedServer(model, cfg) as s:
        yield s


REQUESTS = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT),
            ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}), ("POST", "/tokenize", {"prompt": "hi"}),
            ("POST", "/execute", {"job_id": "k1", "prompt": "hi", "max_tokens": 2}),
            ("POST", "/cancel", {"job_id": "k1"}), ("GET", "/metrics", None), ("GET", "/openapi.json", None),
            ("POST", "/shutdown", None)]


@pytest.mark.parametrize("method,path,body", REQUESTS, ids=[r[1] for r in REQUESTS])
def test_without_the_key_401(server, method, path, body):
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}]:
        r = httpx.request(method, server.uri + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        err = r.json()["error"]
        if path.startswith("/v1/") or path == "/tokenize":
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        else:
            assert err["code"] == "UNAUTHORIZED"
    assert server.worker.status in ("ready", "busy")  # /shutdown without the key did nothing


@pytest.mark.parametrize("method,path,body", REQUESTS[:-1], ids=[r[1] for r in REQUESTS[:-1]])
def test_with_the_key_everything_works(server, method, path, body):
    r = httpx.request(method, server.uri + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code in (200, 202), r.text


def test_health_and_ready_need_no_key(server):
    assert httpx.get(server.uri + "/health").status_code == 200
    assert httpx.get(server.uri + "/ready").status_code == 200


def test_openai_client_with_and_without_the_key(server):
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.uri + "/v1", api_key="nope").models.list()
    assert e.value.code == "invalid_api_key"
    client = openai.OpenAI(base_url=server.uri + "/v1", api_key=KEY)
    out = client.chat.completions.create(model=client.models.list().data[0].id, **CHAT)
    assert out.choices[0].message.content is not None


def test_cors_preflight_and_allowed_origin(server):
    pre = httpx.options(server.uri + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.get(server.uri + "/health", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.get(server.uri + "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_shutdown_without_a_key_is_loopback_only(model):
    import asyncio

    from worker_orcd.server import Worker, create_app

    worker = Worker(model, ServeConfig(ctx=64, max_batch=1))
    app = create_app(worker)

    async def shutdown_from(host: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(host, 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as c:
            return await c.post("/shutdown")

    r = asyncio.run(shutdown_from("203.0.113.7"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN" and not worker.draining
    assert asyncio.run(shutdown_from("::1")).status_code == 202 and worker.draining


def test_busy_port_is_one_line_before_loading(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "worker_orcd.cli", "serve", "--port", str(port), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    taken.close()
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1 and out.count("\n") == 0, out
    assert f"127.0.0.1:{port}" in out and "in use" in out  # one line: no memory check, no load was logged
