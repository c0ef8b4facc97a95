"""Tool calls in generated text, per chat format, parsed as the text streams.

Formats (picked from the chat template, as llama.cpp's server does):
- `harmony` (GPT-OSS): a message `<|start|>assistant to=functions.NAME<|channel|>commentary <|constrain|>json
  <|message|>{...}<|call|>`; the analysis channel is reasoning.
- `hermes` (Qwen2.5): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks amid the content.
- `llama3` (Llama 3.1, JSON tool calls): the whole reply is `{"name": ..., "parameters": {...}}`.
- `generic` (a template without tools, SmolLM2's): the tools are described in the system message and the
  reply is `{"tool_call": {"name": ..., "arguments": {...}}}` (or `{"tool_calls": [...]}`).
A parser turns text into events: `Text(kind, text)` for reasoning or content, `CallStart(index, name)` when
a call's name is known, `CallArgs(index, text)` for its arguments (JSON text, possibly in pieces).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from worker_orcd.tokenizer.harmony import HarmonyParser

FORMATS = ("harmony", "hermes", "llama3", "generic")


@dataclass
class Text:
    kind: str  # "reasoning" | "content"
    text: str


@dataclass
class CallStart:
    index: int
    name: str


@dataclass
class CallArgs:
    index: int
    text: str


Event = Text | CallStart | CallArgs


def detect_format(template: str | None, architecture: str = "") -> str:
    """The tool-call format a chat template speaks."""
    template = template or ""
    if architecture == "gpt-oss" or "<|channel|>" in template:
        return "harmony"
    if "<tool_call>" in template:
        return "hermes"
    if "<|start_header_id|>" in template and "tools" in template:
        return "llama3"
    return "generic"


def call_prefix(fmt: str, name: str | None) -> str:
    """Text appended to the prompt so the reply starts as a call (tool_choice required, or a named one)."""
    if fmt == "harmony":
        return "<|channel|>commentary to=functions." + (f"{name} <|constrain|>json<|message|>" if name else "")
    if fmt == "hermes":
        return "<tool_call>\n{\"name\": \"" + (f"{name}\", \"arguments\": " if name else "")
    if fmt == "llama3":
        return "{\"name\": \"" + (f"{name}\", \"parameters\": " if name else "")
    return "{\"tool_call\": {\"name\": \"" + (f"{name}\", \"arguments\": " if name else "")


def generic_system_prompt(tools: list[dict]) -> str:
    """The tool list and the reply format, for a template that has no tool support."""
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return ("You can call these functions:\n" + listing + "\n\nTo call a function, reply with only this JSON and "
            "nothing else: {\"tool_call\": {\"name\": <function name>, \"arguments\": <arguments object>}}\n"
            "Otherwise answer normally.")


def generic_call_text(name: str, arguments: object) -> str:
    """An earlier assistant call as the generic format writes it."""
    return json.dumps({"tool_call": {"name": name, "arguments": arguments}}, ensure_ascii=False)


def make_parser(fmt: str, tool_names: set[str], harmony: bool = False) -> ToolCallParser:
    """A parser for `fmt`; `tool_names` are the functions offered (a call to any other stays text).
    `harmony`: the model writes harmony channels even with no tools offered."""
    if fmt == "harmony" or harmony:
        return HarmonyToolParser(tool_names)
    if not tool_names:
        return ToolCallParser(tool_names)
    if fmt == "hermes":
        return HermesParser(tool_names)
    return LeadingJSONParser(tool_names, generic=fmt == "generic")


class ToolCallParser:
    """Plain text: everything is content. Subclasses find calls in it."""

    def __init__(self, tool_names: set[str]):
        self.tool_names = tool_names
        self.n_calls = 0

    def feed(self, text: str) -> list[Event]:
        return [Text("content", text)] if text else []

    def finish(self) -> list[Event]:
        return []

    def _call(self, name: str, arguments: object) -> list[Event]:
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        index = self.n_calls
        self.n_calls += 1
        return [CallStart(index, name), CallArgs(index, args)]

    def _calls_from(self, value: object) -> list[tuple[str, object]] | None:
        """(name, arguments) of each call a parsed JSON value makes, or None if it is not a call we know."""
        items = value if isinstance(value, list) else [value]
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            args = item.get("arguments", item.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            if item["name"] not in self.tool_names or not isinstance(args, dict):
                return None
            calls.append((item["name"], args))
        return calls or None


class _ArgStream:
    """A call's arguments object, streamed as it arrives. The JSON it sits in closes with `closers` more
    braces, so the last `closers` braces seen are held back: they may be the enclosing object's."""

    def __init__(self, index: int, closers: int):
        self.index, self.closers = index, closers
        self.sent = ""
        self.held = ""

    def feed(self, text: str, hold_tail: int = 0) -> list[Event]:
        """`hold_tail`: characters at the end that may start a closing tag (held as well)."""
        self.held += text
        braces = [i for i, c in enumerate(self.held) if c == "}"]
        cut = braces[-self.closers] if len(braces) >= self.closers else (braces[0] if braces else
                                                                         len(self.held) - hold_tail)
        return self._send(self.held[:cut], self.held[cut:])

    def finish(self, rest: str = "") -> list[Event]:
        """The call is over: send the arguments' remaining text (up to where the arguments object ends)."""
        self.held += rest
        full = self.sent + self.held
        try:
            _, end = json.JSONDecoder().raw_decode(full)
            tail = full[len(self.sent):max(end, len(self.sent))]
        except json.JSONDecodeError:  # cut short (max_tokens): drop what closes the enclosing object
            tail = self.held.rstrip()
            for _ in range(self.closers):
                tail = tail[:-1].rstrip() if tail.endswith("}") else tail
        return self._send(tail, "")

    def _send(self, text: str, held: str) -> list[Event]:
        self.sent += text
        self.held = held
        return [CallArgs(self.index, text)] if text else []


class HarmonyToolParser(ToolCallParser):
    """GPT-OSS: analysis is reasoning; a message to `functions.NAME` is a call whose body is its arguments;
    final (and commentary to no one, a preamble for the user) is content."""

    def __init__(self, tool_names: set[str]):
        super().__init__(tool_names)
        self.parser = HarmonyParser()
        self._seen = 0  # messages whose header was handled
        self._call_of: dict[int, int] = {}  # message index -> call index

    def feed(self, text: str) -> list[Event]:
        return self._events(self.parser.feed(text))

    def finish(self) -> list[Event]:
        return self._events(self.parser.finish())

    def _events(self, deltas) -> list[Event]:
        out: list[Event] = []
        self._headers(out)
        for d in deltas:
            if d.message in self._call_of:
                out.append(CallArgs(self._call_of[d.message], d.text))
            elif d.recipient is not None:
                continue  # to a tool we were not given (browser, python): neither content nor a call
            else:
                out.append(Text("reasoning" if d.channel == "analysis" else "content", d.text))
        return out

    def _headers(self, out: list[Event]) -> None:
        for i in range(self._seen, len(self.parser.messages)):
            m = self.parser.messages[i]
            name = (m.recipient or "").removeprefix("functions.")
            if m.recipient and m.recipient.startswith("functions.") and name in self.tool_names:
                self._call_of[i] = self.n_calls
                out.append(CallStart(self.n_calls, name))
                self.n_calls += 1
        self._seen = len(self.parser.messages)


class HermesParser(ToolCallParser):
    """Qwen2.5: `<tool_call>{json}</tool_call>` blocks; text around them is content. A block that opens as
    `{"name": "NAME", "arguments": {` streams its arguments as they arrive; any other block is parsed whole
    at its closing tag."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*(?=\{)')

    def __init__(self, tool_names: set[str]):
        super().__init__(tool_names)
        self.buffer = ""
        self.inside = False
        self.args: _ArgStream | None = None  # the call whose arguments are streaming

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        out: list[Event] = []
        while True:
            if not self.inside:
                at = self.buffer.find(self.OPEN)
                if at < 0:
                    # hold a possible tag start, and the whitespace before it (a call may follow)
                    keep = _partial_len(self.buffer, self.OPEN)
                    cut = len(self.buffer[:len(self.buffer) - keep].rstrip())
                    self._content(self.buffer[:cut], out)
                    self.buffer = self.buffer[cut:]
                    return out
                self._content(self.buffer[:at].rstrip(), out)
                self.buffer = self.buffer[at + len(self.OPEN):]
                self.inside = True
            if self.args is None and (m := self.HEAD.match(self.buffer)) and m.group(1) in self.tool_names:
                self.args = _ArgStream(self.n_calls, closers=1)
                self.n_calls += 1
                out.append(CallStart(self.args.index, m.group(1)))
                self.buffer = self.buffer[m.end():]
            at = self.buffer.find(self.CLOSE)
            if at < 0:
                if self.args is not None:
                    out.extend(self.args.feed(self.buffer, _partial_len(self.buffer, self.CLOSE)))
                    self.buffer = ""
                return out
            body, self.buffer = self.buffer[:at], self.buffer[at + len(self.CLOSE):].lstrip("\n")
            if self.args is not None:
                out.extend(self.args.finish(body))
                self.args = None
            else:
                self._block(body, out)
            self.inside = False

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self.args is not None:  # ended (EOS, max_tokens) before the closing tag
            out.extend(self.args.finish(self.buffer))
            self.args = None
        elif self.inside:
            self._block(self.buffer, out)
        else:
            self._content(self.buffer, out)
        self.buffer = ""
        return out

    def _block(self, body: str, out: list[Event]) -> None:
        try:
            calls = self._calls_from(json.loads(body))
        except json.JSONDecodeError:
            calls = None
        if calls is None:  # not a call we can return: the text stays content, as generated
            self._content(self.OPEN + body + self.CLOSE, out)
            return
        for name, args in calls:
            out.extend(self._call(name, args))

    def _content(self, text: str, out: list[Event]) -> None:
        if text.strip() or (text and self.n_calls == 0):  # blank lines between calls are not content
            out.append(Text("content", text))


class LeadingJSONParser(ToolCallParser):
    """Llama 3.1 and the generic format: a reply that starts with `{` (or `<|python_tag|>`) is a call. One
    that opens as a call to a function offered (`{"name": NAME, "parameters": {` / `{"tool_call": {"name":
    NAME, "arguments": {`) streams its arguments; other JSON is held to the end and parsed whole (a call, or
    content after all); any other reply streams as content."""

    HEADS = {False: re.compile(r'\s*(?:<\|python_tag\|>)?\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,'
                               r'\s*"(?:parameters|arguments)"\s*:\s*(?=\{)'),
             True: re.compile(r'\s*\{\s*"tool_call"\s*:\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,'
                              r'\s*"arguments"\s*:\s*(?=\{)')}

    def __init__(self, tool_names: set[str], generic: bool):
        super().__init__(tool_names)
        self.generic = generic
        self.buffer = ""
        self.mode: str | None = None  # None: undecided, "json": holding, "text": streaming
        self.args: _ArgStream | None = None

    def feed(self, text: str) -> list[Event]:
        if self.mode == "text":
            return [Text("content", text)] if text else []
        if self.args is not None:
            return self.args.feed(text)
        self.buffer += text
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head or "<|python_tag|>".startswith(head):
                return []
            self.mode = "json" if head.startswith(("{", "[", "<|python_tag|>")) else "text"
            if self.mode == "text":
                text, self.buffer = self.buffer, ""
                return [Text("content", text)]
        m = self.HEADS[self.generic].match(self.buffer)
        if m is None or m.group(1) not in self.tool_names:
            return []
        self.args = _ArgStream(self.n_calls, closers=2 if self.generic else 1)
        self.n_calls += 1
        rest, self.buffer = self.buffer[m.end():], ""
        return [CallStart(self.args.index, m.group(1)), *self.args.feed(rest)]

    def finish(self) -> list[Event]:
        if self.args is not None:
            return self.args.finish()
        text, self.buffer = self.buffer, ""
        if self.mode != "json":
            return [Text("content", text)] if text else []
        body = text.strip().removeprefix("<|python_tag|>").strip()
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            value = _first_json(body)
        if self.generic and isinstance(value, dict):
            if isinstance(value.get("response"), str) and len(value) == 1:
                return [Text("content", value["response"])]
            value = value.get("tool_calls", value.get("tool_call", value))
        calls = self._calls_from(value) if value is not None else None
        if calls is None:
            return [Text("content", text)]
        return [e for name, args in calls for e in self._call(name, args)]


def _first_json(text: str) -> object | None:
    """The JSON value at the start of `text` when trailing text follows it (a model that keeps talking)."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value


def _partial_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that could begin `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
