"""Chat output splitting: GPT-OSS harmony channels into reasoning and content; tool calls per chat format."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from worker_orcd.server.chat import ChatOutput, ToolPlan
from worker_orcd.tokenizer.tool_calls import call_prefix, detect_format

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def run(arch: str, pieces: list[str], plan: ToolPlan | None = None):
    out = ChatOutput(SimpleNamespace(architecture=arch, tokenizer=None), plan)
    deltas = [out.push(p) for p in pieces] + [out.finish()]
    return deltas, out.result()


def test_harmony_analysis_is_reasoning_final_is_content():
    # the prompt ends in <|start|>assistant; the final <|return|> is an end-of-generation token, never text
    pieces = ["<|channel|>", "analysis", "<|message|>", "The user", " greets.", "<|end|>",
              "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "Hello", "!"]
    deltas, (reasoning, content, calls) = run("gpt-oss", pieces)
    assert reasoning == "The user greets." and content == "Hello!" and calls == []
    assert "".join(d.reasoning for d in deltas) == reasoning and "".join(d.content for d in deltas) == content


def test_harmony_call_to_an_unoffered_tool_is_neither():
    pieces = ["<|channel|>", "commentary to=functions.get", " <|constrain|>json", "<|message|>", "{}", "<|call|>"]
    _, (reasoning, content, calls) = run("gpt-oss", pieces)
    assert reasoning == "" and content == "" and calls == []


def test_plain_model_is_all_content():
    deltas, (reasoning, content, calls) = run("llama", ["Hi", " there"])
    assert reasoning is None and content == "Hi there" and [d.content for d in deltas[:2]] == ["Hi", " there"]


def stream_calls(deltas) -> list[dict]:
    """Tool-call deltas accumulated as the openai client does."""
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls:
            c = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.get("id") or c["id"]
            c["name"] += tc.get("function", {}).get("name", "")
            c["arguments"] += tc.get("function", {}).get("arguments", "")
    return [calls[i] for i in sorted(calls)]


REPLIES = {
    "harmony": ["<|channel|>analysis<|message|>", "Need weather.", "<|end|><|start|>assistant", "<|channel|>",
                "commentary to=functions.get_weather <|constrain|>", "json<|message|>", '{"city"', ': "Paris"}'],
    "hermes": ["Let me check.", "\n<tool", "_call>\n", '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}',
               "\n</tool_call>"],
    "llama3": ['{"name": "get_weather", ', '"parameters": {"city": "Paris"}}'],
    "generic": ['{"tool_call": {"name": "get_weather", ', '"arguments": {"city": "Paris"}}}'],
}


@pytest.mark.parametrize("fmt", list(REPLIES))
def test_tool_call_parsed_streamed_and_whole(fmt):
    arch = "gpt-oss" if fmt == "harmony" else "llama"
    deltas, (reasoning, content, calls) = run(arch, REPLIES[fmt], ToolPlan(fmt, TOOLS))
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    streamed = stream_calls(deltas)
    assert [(c["id"], c["name"], c["arguments"]) for c in streamed] == \
        [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert content == ("Let me check." if fmt == "hermes" else None)
    assert reasoning == ("Need weather." if fmt == "harmony" else None)


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "generic"])
def test_text_that_is_not_a_call_stays_content(fmt):
    for reply in (["The weather", " is fine."], ['{"name": "unknown_fn", "arguments": {}}'], ["{not json"]):
        _, (_, content, calls) = run("llama", reply, ToolPlan(fmt, TOOLS))
        assert calls == [] and content == "".join(reply)


def test_generic_response_object_is_content():
    _, (_, content, calls) = run("llama", ['{"response": "Hi!"}'], ToolPlan("generic", TOOLS))
    assert calls == [] and content == "Hi!"


def test_hermes_parallel_calls_and_parallel_false():
    reply = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>\n',
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "B"}}\n</tool_call>']
    _, (_, content, calls) = run("qwen2", reply, ToolPlan("hermes", TOOLS))
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["A", "B"] and content is None
    _, (_, _, calls) = run("qwen2", reply, ToolPlan("hermes", TOOLS, parallel=False))
    assert len(calls) == 1


@pytest.mark.parametrize("fmt", list(REPLIES))
def test_forced_call_prefix_is_parsed_with_the_reply(fmt):
    arch = "gpt-oss" if fmt == "harmony" else "llama"
    prefix = call_prefix(fmt, "get_weather")
    end = {"harmony": "", "hermes": "}\n</tool_call>", "llama3": "}", "generic": "}}"}[fmt]
    deltas, (_, _, calls) = run(arch, ['{"city": ', '"Oslo"}', end], ToolPlan(fmt, TOOLS, prefix))
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert stream_calls(deltas)[0]["name"] == "get_weather"


def test_detect_format_from_templates():
    from pathlib import Path

    t = Path("/work/shared/templates")
    assert detect_format((t / "openai-gpt-oss-120b.jinja").read_text()) == "harmony"
    assert detect_format((t / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()) == "hermes"
    assert detect_format((t / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()) == "llama3"
    assert detect_format("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}") == "generic"


def test_hermes_arguments_stream_as_they_arrive():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"a": 2}]}}\n</tool_call>'
    deltas, (_, content, calls) = run("qwen2", list(text), ToolPlan("hermes", TOOLS))  # one character a token
    pieces = [tc["function"]["arguments"] for d in deltas for tc in d.tool_calls if tc["function"]["arguments"]]
    assert len(pieces) > 5 and "".join(pieces) == '{"city": "Paris", "days": [1, {"a": 2}]}'
    assert calls[0]["function"]["arguments"] == "".join(pieces) and content is None
    assert stream_calls(deltas)[0]["name"] == "get_weather"
    # a name first seen in full, arguments as a JSON string: parsed whole at the closing tag
    _, (_, _, calls) = run("qwen2", ['<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}',
                                     "</tool_call>"], ToolPlan("hermes", TOOLS))
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}


@pytest.mark.parametrize("fmt,text", [
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, {"a": 2}]}}'),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, {"a": 2}]}}'),
    ("generic", '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"a": 2}]}}}'),
    ("generic", '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"a": 2}]}}}\n'
                'Anything else?'),
])
def test_leading_json_arguments_stream_as_they_arrive(fmt, text):
    deltas, (_, content, calls) = run("llama", list(text), ToolPlan(fmt, TOOLS))
    pieces = [tc["function"]["arguments"] for d in deltas for tc in d.tool_calls if tc["function"]["arguments"]]
    assert len(pieces) > 5 and "".join(pieces) == '{"city": "Paris", "days": [1, {"a": 2}]}'
    assert calls[0]["function"]["arguments"] == "".join(pieces) and content is None


def test_arguments_cut_short_keep_what_came():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    _, (_, _, calls) = run("qwen2", list(text), ToolPlan("hermes", TOOLS))
    assert calls[0]["function"]["arguments"] == '{"city": "Par'
