"""Server-sent events framing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_RESPONSE = {200: {"description": "a text/event-stream of events", "content": {"text/event-stream": {}}}}


# json.dumps escapes the C0 controls but writes these as they are, and clients that split a stream into lines
# with str.splitlines (httpx, so the openai client) would cut a `data:` line inside a token's text
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False).translate(_LINE_BREAKS)


def event(name: str, data: Any) -> str:
    """A named event (worker API): `event: name` then one `data:` line of JSON."""
    return f"event: {name}\ndata: {_json(data)}\n\n"


def data(payload: Any) -> str:
    """An unnamed event (OpenAI API): `data: {json}`, or `data: [DONE]` for a string."""
    body = payload if isinstance(payload, str) else _json(payload)
    return f"data: {body}\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream whose `on_close` runs however the response ends: finished, failed, or the client
    gone before the first event (under ASGI 2.4 Starlette stops at the first failed send, before the body
    starts, so the body's own cleanup would never run and the job would decode on for nobody)."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
