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


HARMONY_ARCHES = {"gpt-oss"}
HARMONY_SPECIALS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")


class ChatOutput:
    """The assistant's reply as (reasoning, content). A plain model's text is all content; GPT-OSS
    (harmony) writes `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...`,
    where the analysis channel is reasoning and the others are content."""

    def __init__(self, worker):
        self.harmony = worker.architecture in HARMONY_ARCHES
        self.specials = _special_ids(worker.tokenizer) if self.harmony else {}
        self.reasoning: list[str] | None = [] if self.harmony else None
        self.content: list[str] = []
        self.state = "header" if self.harmony else "body"  # header: reading a channel name; body: a message
        self.header = ""
        self.channel = "final"

    def push(self, token: int, text: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for one generated token."""
        if not self.harmony:
            self.content.append(text)
            return "", text
        special = self.specials.get(token)
        if special is not None:
            self._special(special)
            return "", ""
        if self.state == "header":
            self.header += text
            return "", ""
        if self.state != "body":
            return "", ""
        if self.channel == "analysis":
            self.reasoning.append(text)
            return text, ""
        self.content.append(text)
        return "", text

    def _special(self, special: str) -> None:
        if special in ("<|start|>", "<|channel|>"):
            self.state, self.header = "header", ""
        elif special == "<|message|>":
            # the header reads e.g. "analysis" or "final" or "commentary to=functions.x"
            words = self.header.replace("<|channel|>", " ").split()
            self.channel = next((w for w in words if w in ("analysis", "final", "commentary")), "final")
            self.state = "body"
        else:  # <|end|>, <|return|>, <|call|>, <|constrain|>: the message is over
            self.state = "between"

    def result(self) -> tuple[str | None, str]:
        reasoning = None if self.reasoning is None else "".join(self.reasoning)
        return reasoning, "".join(self.content)


def _special_ids(tok) -> dict[int, str]:
    """Token id -> harmony special token, for those the vocabulary has as one token."""
    out = {}
    for name in HARMONY_SPECIALS:
        ids = tok.tokenize(name, add_special=False, parse_special=True)
        if len(ids) == 1:
            out[ids[0]] = name
    return out
