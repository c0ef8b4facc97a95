"""Server-sent events framing."""

from __future__ import annotations

import json
from typing import Any

SSE_RESPONSE = {200: {"description": "a text/event-stream of events", "content": {"text/event-stream": {}}}}


def event(name: str, data: Any) -> str:
    """A named event (worker API): `event: name` then one `data:` line of JSON."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def data(payload: Any) -> str:
    """An unnamed event (OpenAI API): `data: {json}`, or `data: [DONE]` for a string."""
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"
