"""GPT-OSS harmony: rendering a conversation and parsing what the model generates.

A generated turn is a run of messages, each a header then a body:
`<|start|>assistant<|channel|>analysis<|message|>...<|end|>`,
`<|start|>assistant<|channel|>final<|message|>...<|return|>`, or a tool call
`<|start|>assistant to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>{...}<|call|>`.
The prompt usually ends in `<|start|>assistant`, so the first header has no `<|start|>` or role.
`HarmonyParser.feed` takes text as it streams (special tokens rendered, as `detokenize` does) and
returns body text as soon as it cannot be the start of a marker. Rendering a conversation is the
model's chat template (`Tokenizer.apply_chat_template`).
"""

from __future__ import annotations

from dataclasses import dataclass

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, RETURN, CALL = "<|end|>", "<|return|>", "<|call|>"
STOPS = (END, RETURN, CALL)


@dataclass
class HarmonyMessage:
    role: str = "assistant"
    channel: str | None = None          # "analysis", "commentary" or "final"
    recipient: str | None = None        # e.g. "functions.get_weather" for a tool call
    content_type: str | None = None     # e.g. "json" (from `<|constrain|>json`)
    content: str = ""
    stop: str | None = None             # the marker that closed it; None while open


@dataclass
class HarmonyDelta:
    """Body text that arrived for the open message."""
    channel: str | None
    recipient: str | None
    text: str
    message: int = -1  # its index in HarmonyParser.messages


@dataclass
class ToolCall:
    name: str          # without the "functions." namespace
    arguments: str     # as generated (JSON text when content_type is "json")


class HarmonyParser:
    """Incremental parser of generated harmony text into messages by channel."""

    def __init__(self) -> None:
        self.messages: list[HarmonyMessage] = []
        self._buffer = ""  # text not yet placed: a header in progress, or a possible marker start
        self._in_body = False

    def feed(self, text: str) -> list[HarmonyDelta]:
        """Consume generated text; return the body text now known to be content."""
        self._buffer += text
        deltas: list[HarmonyDelta] = []
        while self._step(deltas):
            pass
        return deltas

    def finish(self, stop: str | None = None) -> list[HarmonyDelta]:
        """End of generation: whatever was held back is body text of the open message. `stop` is the
        end-of-generation token that ended it (`<|return|>`, `<|call|>`), which the engine stops on
        rather than feeding as text; it closes the open message."""
        deltas: list[HarmonyDelta] = []
        if self._in_body:
            self._emit(self._buffer, deltas)
            self.messages[-1].stop = stop
            self._in_body = False
        self._buffer = ""
        return deltas

    def _step(self, deltas: list[HarmonyDelta]) -> bool:
        if not self._in_body:
            at = self._buffer.find(MESSAGE)
            if at < 0:
                return False
            self.messages.append(parse_header(self._buffer[:at]))
            self._buffer = self._buffer[at + len(MESSAGE):]
            self._in_body = True
            return True
        hits = [(self._buffer.find(m), m) for m in STOPS if m in self._buffer]
        if not hits:
            keep = _partial_marker_len(self._buffer)
            self._emit(self._buffer[: len(self._buffer) - keep], deltas)
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        at, stop = min(hits)
        self._emit(self._buffer[:at], deltas)
        self.messages[-1].stop = stop
        self._buffer = self._buffer[at + len(stop):]
        self._in_body = False
        return True

    def _emit(self, text: str, deltas: list[HarmonyDelta]) -> None:
        if text:
            message = self.messages[-1]
            message.content += text
            deltas.append(HarmonyDelta(message.channel, message.recipient, text, len(self.messages) - 1))

    def text(self, channel: str) -> str:
        """All body text of one channel, in order."""
        return "".join(m.content for m in self.messages if m.channel == channel and m.recipient is None)

    @property
    def analysis(self) -> str:
        return self.text("analysis")

    @property
    def final(self) -> str:
        return self.text("final")

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Completed calls to `functions.*` recipients."""
        return [ToolCall(m.recipient.removeprefix("functions."), m.content) for m in self.messages
                if m.recipient and m.recipient.startswith("functions.") and m.stop is not None]


def _partial_marker_len(text: str) -> int:
    """Length of the longest suffix of `text` that could begin a stop marker."""
    for n in range(min(len(text), max(len(m) for m in STOPS) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in STOPS):
            return n
    return 0


def parse_header(header: str) -> HarmonyMessage:
    """`[<|start|>]role[ to=R]<|channel|>name[ to=R][ <|constrain|>type]` -> an empty HarmonyMessage."""
    words = header.replace(START, " ").replace(CHANNEL, " channel=").replace(CONSTRAIN, " constrain=").split()
    message = HarmonyMessage()
    seen_role = False
    for word in words:
        key, _, value = word.partition("=")
        if key == "to" and value:
            message.recipient = value
        elif key == "channel" and value:
            message.channel = value
        elif key == "constrain" and value:
            message.content_type = value
        elif message.channel is None and not seen_role:
            message.role, seen_role = word, True
        elif message.channel is not None:
            message.content_type = word  # "<|channel|>commentary json": a bare content type
    return message

