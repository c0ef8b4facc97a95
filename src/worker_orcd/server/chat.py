"""Chat prompts from the GGUF's template, and the assistant's output split into reasoning and content."""

from __future__ import annotations

from worker_orcd.server.errors import APIError
from worker_orcd.server.schemas import Message


def _text(m: Message) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "".join(part.text for part in m.content)


def render_chat(worker, messages: list[Message], reasoning_effort: str | None) -> list[int]:
    """Token ids of the conversation rendered with the model's chat template, ready for the reply."""
    tok = worker.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "INVALID_REQUEST", f"model {worker.model_id} has no chat template", "messages")
    kw = {"reasoning_effort": reasoning_effort} if reasoning_effort else {}
    try:
        text = tok.apply_chat_template([{"role": m.role, "content": _text(m)} for m in messages],
                                       add_generation_prompt=True, **kw)
    except Exception as e:  # a template may raise on a conversation it does not accept (roles out of order)
        raise APIError(400, "INVALID_REQUEST", f"the chat template rejected the messages: {e}", "messages") from None
    ids = tok.tokenize(text, add_special=False, parse_special=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


class ChatOutput:
    """Accumulates the assistant's reply; a plain model's text is all content."""

    def __init__(self, worker):
        self.reasoning: list[str] | None = None
        self.content: list[str] = []

    def push(self, token: int, text: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for one generated token."""
        self.content.append(text)
        return "", text

    def result(self) -> tuple[str | None, str]:
        reasoning = None if self.reasoning is None else "".join(self.reasoning)
        return reasoning, "".join(self.content)
