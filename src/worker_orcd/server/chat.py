"""Chat prompts from the GGUF's template (with tools), and the assistant's output split into reasoning,
content and tool calls."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker_orcd.server.errors import APIError
from worker_orcd.server.schemas import Message, NamedToolChoice, Tool
from worker_orcd.tokenizer.tool_calls import (
    CallArgs,
    CallStart,
    Text,
    call_prefix,
    detect_format,
    generic_call_text,
    generic_system_prompt,
    make_parser,
)

if TYPE_CHECKING:
    from worker_orcd.server.worker import Worker

HARMONY_ARCHES = {"gpt-oss"}


@dataclass
class ToolPlan:
    """How a request's tools reach the prompt and come back out of the reply."""
    fmt: str  # harmony | hermes | llama3 | generic
    tools: list[dict] = field(default_factory=list)  # offered to the model ([] for tool_choice none)
    prefix: str = ""  # appended to the prompt: the start of a forced call
    parallel: bool = True
    forced: bool = False  # tool_choice required or named: the reply is a call (grammar-constrained)
    forced_name: str | None = None

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


def tool_plan(worker: Worker, tools: list[Tool] | None, tool_choice: str | NamedToolChoice | None,
              parallel: bool | None, json_output: bool = False) -> ToolPlan:
    """`json_output`: the reply is constrained to JSON (response_format); GPT-OSS then answers in its final
    channel at once, since the grammar covers the reply from its first token."""
    fmt = detect_format(getattr(worker.tokenizer, "chat_template", None), worker.architecture)
    if not tools or tool_choice == "none":
        prefix = "<|channel|>final<|message|>" if json_output and fmt == "harmony" else ""
        return ToolPlan(fmt, prefix=prefix, parallel=parallel is not False)
    offered = [t.model_dump(exclude_none=True) for t in tools]
    for t in offered:  # templates print the description unguarded (GPT-OSS's fails on a missing one)
        t["function"].setdefault("description", "")
    plan = ToolPlan(fmt, offered, parallel=parallel is not False)
    if tool_choice == "required" or isinstance(tool_choice, NamedToolChoice):
        # the reply starts as a call (its opening ends the prompt) and a grammar constrains the rest
        name = tool_choice.function.name if isinstance(tool_choice, NamedToolChoice) else None
        plan.prefix, plan.forced, plan.forced_name = call_prefix(fmt, name), True, name
    return plan


def _text(m: Message) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "".join(part.text for part in m.content)


def _arguments(text: str) -> object:
    """Templates print arguments with `tojson`, so they get the object; text that is not JSON stays text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def template_messages(messages: list[Message], plan: ToolPlan) -> list[dict]:
    """The conversation as chat templates take it (HF conventions): tool calls with their arguments as
    objects, tool results with their call's id and name; for the generic format, both as plain text."""
    names = {c.id: c.function.name for m in messages for c in m.tool_calls or []}
    out: list[dict] = []
    for m in messages:
        d: dict = {"role": m.role, "content": _text(m)}
        if m.name is not None:
            d["name"] = m.name
        if m.role == "assistant" and m.tool_calls:
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                     for c in m.tool_calls]
            if plan.fmt == "generic":
                texts = [generic_call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls]
                d["content"] = "\n".join(([d["content"]] if d["content"] else []) + texts)
            else:
                d["tool_calls"] = calls
                if m.reasoning_content and not d["content"]:
                    d["thinking"] = m.reasoning_content  # GPT-OSS renders the analysis before a call
        if m.role == "tool":
            name = m.name or names.get(m.tool_call_id or "")
            if plan.fmt == "generic":
                d = {"role": "user", "content": json.dumps({"tool_response": {"name": name, "content": d["content"]}},
                                                           ensure_ascii=False)}
            else:
                d.update(tool_call_id=m.tool_call_id, name=name)
        out.append(d)
    if plan.fmt == "generic" and plan.tools:
        system = generic_system_prompt(plan.tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def render_chat(worker: Worker, messages: list[Message], reasoning_effort: str | None,
                plan: ToolPlan | None = None) -> list[int]:
    """Token ids of the conversation rendered with the model's chat template, ready for the reply."""
    tok = worker.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "INVALID_REQUEST", f"model {worker.model_id} has no chat template", "messages")
    plan = plan or tool_plan(worker, None, None, None)
    kw: dict = {"reasoning_effort": reasoning_effort} if reasoning_effort else {}
    if plan.tools and plan.fmt != "generic":
        kw["tools"] = plan.tools
    try:
        text = tok.apply_chat_template(template_messages(messages, plan), add_generation_prompt=True, **kw)
    except Exception as e:  # a template may raise on a conversation it does not accept (roles out of order)
        raise APIError(400, "INVALID_REQUEST", f"messages: the chat template rejected the messages: {e}",
                       "messages") from None
    text += plan.prefix
    worker.check_prompt_bytes(text, "messages", ignore_whitespace=True)
    ids = tok.tokenize(text, add_special=False, parse_special=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


def call_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI streaming deltas: {index, id?, function}


class ChatOutput:
    """The assistant's reply as reasoning, content and tool calls. A plain model's text is all content;
    GPT-OSS writes harmony messages (analysis: reasoning, final: content, to=functions.X: a call)."""

    def __init__(self, worker: Worker, plan: ToolPlan | None = None):
        plan = plan or ToolPlan(detect_format(getattr(worker.tokenizer, "chat_template", None), worker.architecture))
        self.harmony = worker.architecture in HARMONY_ARCHES or plan.fmt == "harmony"
        self.parser = make_parser(plan.fmt, plan.names, harmony=self.harmony)
        self.parallel = plan.parallel
        self.reasoning: list[str] | None = [] if self.harmony else None
        self.content: list[str] = []
        self.calls: list[dict] = []
        self._pending = self._apply(self.parser.feed(plan.prefix)) if plan.prefix else ChatDelta()

    def push(self, text: str) -> ChatDelta:
        """What the text one generated token released adds to the reply."""
        delta = self._apply(self.parser.feed(text))
        if self._pending is not None:  # what the forced-call prefix opened goes out with the first token
            first, self._pending = self._pending, None
            delta = ChatDelta(first.reasoning + delta.reasoning, first.content + delta.content,
                              first.tool_calls + delta.tool_calls)
        return delta

    def finish(self) -> ChatDelta:
        """What the parser held back, once generation has ended."""
        delta = self.push("")
        more = self._apply(self.parser.finish())
        return ChatDelta(delta.reasoning + more.reasoning, delta.content + more.content,
                         delta.tool_calls + more.tool_calls)

    def _apply(self, events) -> ChatDelta:
        delta = ChatDelta()
        for ev in events:
            if isinstance(ev, Text):
                if ev.kind == "reasoning":
                    delta.reasoning += ev.text
                else:
                    delta.content += ev.text
            elif ev.index > 0 and not self.parallel:
                continue  # parallel_tool_calls false: the first call only
            elif isinstance(ev, CallStart):
                call = {"id": call_id(), "type": "function", "function": {"name": ev.name, "arguments": ""}}
                self.calls.append(call)
                delta.tool_calls.append({"index": ev.index, "id": call["id"], "type": "function",
                                         "function": {"name": ev.name, "arguments": ""}})
            elif isinstance(ev, CallArgs):
                self.calls[ev.index]["function"]["arguments"] += ev.text
                if delta.tool_calls and delta.tool_calls[-1]["index"] == ev.index:
                    delta.tool_calls[-1]["function"]["arguments"] += ev.text
                else:
                    delta.tool_calls.append({"index": ev.index, "function": {"arguments": ev.text}})
        if self.reasoning is not None:
            self.reasoning.append(delta.reasoning)
        self.content.append(delta.content)
        return delta

    def result(self) -> tuple[str | None, str | None, list[dict]]:
        """(reasoning, content, tool calls) of the whole reply; content is None when only calls were made."""
        reasoning = None if self.reasoning is None else "".join(self.reasoning)
        content = "".join(self.content)
        return reasoning, (content or None) if self.calls else content, self.calls
