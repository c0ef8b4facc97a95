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
    worker.check_prompt_bytes(text, "messages", ignore_whitespace=True)
    ids = tok.tokenize(text, add_special=False, parse_special=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


HARMONY_ARCHES = {"gpt-oss"}


class ChatOutput:
    """The assistant's reply as (reasoning, content). A plain model's text is all content; GPT-OSS
    writes harmony messages, where the analysis channel is reasoning and the final channel content."""

    def __init__(self, worker):
        from worker_orcd.tokenizer.harmony import HarmonyParser

        self.parser = HarmonyParser() if worker.architecture in HARMONY_ARCHES else None
        self.reasoning: list[str] | None = None if self.parser is None else []
        self.content: list[str] = []

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for the text one generated token released."""
        if self.parser is None:
            self.content.append(text)
            return "", text
        return self._route(self.parser.feed(text))

    def finish(self) -> tuple[str, str]:
        """What the harmony parser held back, once generation has ended."""
        return ("", "") if self.parser is None else self._route(self.parser.finish())

    def _route(self, deltas) -> tuple[str, str]:
        reasoning = "".join(d.text for d in deltas if d.channel == "analysis")
        content = "".join(d.text for d in deltas if d.channel != "analysis" and d.recipient is None)
        self.reasoning.append(reasoning)
        self.content.append(content)
        return reasoning, content

    def result(self) -> tuple[str | None, str]:
        reasoning = None if self.reasoning is None else "".join(self.reasoning)
        return reasoning, "".join(self.content)
