"""What a client may send before any parsing: a bounded body, and deadlines for the request head and body.

A slow client (slow-loris) holds a connection, and a body buffer, for as long as it trickles bytes; uvicorn
only times out idle keep-alive connections. So the head must arrive within `read_timeout` of the connection
opening (or of its first byte, on a kept-alive connection), and the body within `read_timeout` more; else
408 and the connection closes. Oversized bodies get 413 from their Content-Length, or as soon as the bytes counted
pass the limit (chunked bodies), without reading the rest.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from worker_orcd.server.errors import error_response, is_openai


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: reads the whole body first (at most `max_bytes`, within `timeout_s`), then hands
    it to the app as one message; later receive() calls (a disconnect) go to the server."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float,
                 on_error: Callable[[int], None] = lambda status: None):
        self.app, self.max_bytes, self.timeout_s, self.on_error = app, max_bytes, timeout_s, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            return await self._refuse(scope, receive, send, 413, "PAYLOAD_TOO_LARGE",
                                      f"the request body of {length} bytes is over the limit of {self.max_bytes} "
                                      f"bytes (--max-body-bytes)")
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except BodyTooLarge:
            return await self._refuse(scope, receive, send, 413, "PAYLOAD_TOO_LARGE",
                                      f"the request body is over the limit of {self.max_bytes} bytes "
                                      f"(--max-body-bytes)")
        except asyncio.TimeoutError:
            return await self._refuse(scope, receive, send, 408, "REQUEST_TIMEOUT",
                                      f"the request body did not arrive within {self.timeout_s:g} s "
                                      f"(--read-timeout-sec)")
        if body is None:  # the client left while sending: nobody to answer
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise BodyTooLarge
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str) -> None:
        self.on_error(status)
        response = error_response(status, code, message, "body", openai=is_openai(scope.get("path", "")))
        response.headers["connection"] = "close"  # the unread rest of the body must not be taken for a request
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # h11 has already refused a malformed one
    return None


def _raw_json_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for answers given outside the ASGI app (the
    path is not known yet, so the body carries the fields of both error shapes)."""
    body = json.dumps({"error": {"code": code, "message": message, "type": "invalid_request_error",
                                 "param": None}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode() + body


class _LingeringTransport:
    """The transport as uvicorn sees it: close() goes through the protocol, which may linger first."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def pause_reading(self) -> None:
        if not self._protocol.lingering:
            self._transport.pause_reading()

    def close(self) -> None:
        self._protocol.close_connection()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head (status line and headers), counted
    from the connection opening or the head's first byte; JSON for requests h11 cannot parse; and a
    lingering close. An idle keep-alive connection is uvicorn's (--timeout-keep-alive) and closes silently.

    Lingering (as nginx and Apache do): closing a socket that still has unread bytes sends a TCP reset, and
    the client's kernel then drops our 413/408 before the client reads it. So when the client may still be
    sending, we send FIN, discard what arrives, and close once it closes or `read_timeout` has passed."""

    read_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self.lingering = False
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm()  # a connection that never sends a byte is held no longer than a slow one

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of a new request head
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a complete request head arrived: the app's body deadline takes over
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_raw_json_response(400, "Bad Request", "INVALID_REQUEST",
                                                "malformed HTTP request (or headers over 16 KiB)"))
        self.transport.close()

    def close_connection(self) -> None:
        raw = self.transport._transport  # type: ignore[attr-defined]
        if raw.is_closing() or self.lingering:
            return
        quiet = self.conn.their_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE, h11.CLOSED) and \
            not self.conn.trailing_data[0]
        if quiet or not raw.can_write_eof():
            raw.close()
            return
        self.lingering = True
        self._disarm()
        raw.write_eof()  # after what is buffered: the response
        raw.resume_reading()
        self.loop.call_later(self.read_timeout, raw.close)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self.conn.trailing_data[0]:  # part of a head arrived; a connection that sent nothing just closes
            self.transport.write(_raw_json_response(408, "Request Timeout", "REQUEST_TIMEOUT",
                                                    f"the request head did not arrive within {self.read_timeout:g} "
                                                    f"s (--read-timeout-sec)"))
        self.transport.close()


def guarded_protocol(read_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn.Config(http=...), with this deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"read_timeout": read_timeout_s})
