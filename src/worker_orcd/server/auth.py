"""`--api-key`: a Bearer token on every endpoint but /health and /ready (probes carry no secrets), compared
in constant time; checked before the body is read."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from worker_orcd.server.errors import error_response, is_openai

OPEN_PATHS = frozenset({"/health", "/ready"})


class APIKeyAuth:
    """ASGI middleware: 401 unless `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, key: str, on_error: Callable[[int], None] = lambda status: None):
        self.app, self.key, self.on_error = app, key.encode(), on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        self.on_error(401)
        response = error_response(401, "UNAUTHORIZED", "missing or wrong API key: send the header "
                                                       "'Authorization: Bearer <key>' (--api-key)",
                                  openai=is_openai(scope["path"]))
        response.headers["connection"] = "close"  # the body was not read
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        return hmac.compare_digest(given, self.key)


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine (127.0.0.0/8, ::1)."""
    try:
        return host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
