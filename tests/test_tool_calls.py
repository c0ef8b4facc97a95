"""Tool calling end to end, per chat format: a request with tools -> tool_calls -> a tool result -> the final
answer, through the openai client and langchain-openai, streamed and not. The model is scripted
(tests/scripted_model.py), so what is tested is the template rendering and the parsing of its output."""

from __future__ import annotations

import json

import pytest

from tests.scripted_model import scripted_model
from tests.server_helpers import LiveServer
from worker_orcd.server import ServeConfig

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "City name"}}}}}]
QUESTION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]
RESULT = "22 C and sunny"
ANSWER = "It is 22 C and sunny in Paris."

CALLS = {  # what each model family writes to call get_weather(city="Paris")
    "harmony": "<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant<|channel|>"
               "commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>",
    "hermes": "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "llama3": "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
    "generic": "{\"tool_call\": {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}}",
}
FINALS = {
    "harmony": f"<|channel|>analysis<|message|>Tool says sunny.<|end|><|start|>assistant<|channel|>final"
               f"<|message|>{ANSWER}",
    "hermes": ANSWER, "llama3": ANSWER, "generic": ANSWER,
}
# how each template renders the earlier call and its result into the second prompt
RENDERED = {
    "harmony": ["<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
                "{\"city\": \"Paris\"}<|call|>",
                f"<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>\"{RESULT}\"<|end|>"],
    "hermes": ["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
               f"<|im_start|>user\n<tool_response>\n{RESULT}\n</tool_response><|im_end|>"],
    "llama3": ["<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": "
               "{\"city\": \"Paris\"}}<|eot_id|>",  # the template quotes the result (a string is iterable in jinja)
               f"<|start_header_id|>ipython<|end_header_id|>\n\n\"{RESULT}\"<|eot_id|>"],
    "generic": ["{\"tool_call\": {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}}",
                json.dumps({"tool_response": {"name": "get_weather", "content": RESULT}})],
}
TOOLS_RENDERED = {"harmony": "type get_weather = (_: {\n// City name\ncity: string,\n}) => any;",
                  "hermes": "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>",
                  "llama3": "\"name\": \"get_weather\"", "generic": "You can call these functions:"}


def script(fmt: str):
    def reply(prompt: str) -> str:
        if "FORCE" in prompt:  # tool_choice tests: the reply after the forced call's start
            return {"harmony": "{\"city\": \"Oslo\"}", "hermes": "{\"city\": \"Oslo\"}}\n</tool_call>",
                    "llama3": "{\"city\": \"Oslo\"}}", "generic": "{\"city\": \"Oslo\"}}}"}[fmt]
        return FINALS[fmt] if RESULT in prompt else CALLS[fmt]
    return reply


FORMATS = list(CALLS)


@pytest.fixture(scope="module", params=FORMATS)
def served(request):
    fmt = request.param
    model = scripted_model(fmt, script(fmt))
    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=4096, max_batch=2, prefill_chunk=4096, max_tokens_out=256)
    with LiveServer(model, cfg) as s:
        yield fmt, s, model.net


def accumulate(chunks) -> tuple[str, str | None, list[dict], str | None]:
    """(content, reasoning, tool calls, finish reason) from streamed openai chunks, as a client rebuilds them."""
    content, reasoning, calls, finish = "", None, {}, None
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        extra = (d.model_extra or {}).get("reasoning_content")
        if extra:
            reasoning = (reasoning or "") + extra
        for tc in d.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "type": "function",
                                               "function": {"name": "", "arguments": ""}})
            call["id"] = tc.id or call["id"]
            call["function"]["name"] += tc.function.name or ""
            call["function"]["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_client_round_trip(served, stream):
    import openai

    fmt, server, net = served
    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    n_prompts = len(net.prompts)
    kw = dict(model=server.worker.model_id, tools=TOOLS, max_tokens=200)
    if stream:
        content, reasoning, calls, finish = accumulate(client.chat.completions.create(
            messages=QUESTION, stream=True, **kw))
        assistant = {"role": "assistant", "content": content or None, "tool_calls": calls}
    else:
        first = client.chat.completions.create(messages=QUESTION, **kw)
        msg, finish = first.choices[0].message, first.choices[0].finish_reason
        content, calls = msg.content, [c.model_dump() for c in msg.tool_calls or []]
        reasoning = (msg.model_extra or {}).get("reasoning_content")
        assistant = msg  # the response's message object goes back into the conversation as it is
    assert finish == "tool_calls" and not content
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"} and calls[0]["id"].startswith("call_")
    assert reasoning == ("Need the weather tool." if fmt == "harmony" else None)
    assert TOOLS_RENDERED[fmt] in net.prompts[n_prompts], net.prompts[n_prompts][-1500:]

    messages = [*QUESTION, assistant, {"role": "tool", "tool_call_id": calls[0]["id"], "content": RESULT}]
    if stream:
        content, reasoning, calls, finish = accumulate(client.chat.completions.create(
            messages=messages, stream=True, **kw))
    else:
        final = client.chat.completions.create(messages=messages, **kw)
        content, calls, finish = final.choices[0].message.content, final.choices[0].message.tool_calls, \
            final.choices[0].finish_reason
    assert content == ANSWER and not calls and finish == "stop"
    prompt = net.prompts[-1]
    for piece in RENDERED[fmt]:
        assert piece in prompt, (piece, prompt[-800:])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_langchain_round_trip(served, stream):
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    fmt, server, net = served
    llm = ChatOpenAI(base_url=server.uri + "/v1", api_key="unused", model=server.worker.model_id, max_tokens=200,
                     temperature=0).bind_tools(TOOLS)
    messages = [SystemMessage(QUESTION[0]["content"]), HumanMessage(QUESTION[1]["content"])]
    if stream:
        ai = None
        for chunk in llm.stream(messages):
            ai = chunk if ai is None else ai + chunk
    else:
        ai = llm.invoke(messages)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "Paris"})]
    messages += [ai, ToolMessage(RESULT, tool_call_id=ai.tool_calls[0]["id"])]
    if stream:
        final = None
        for chunk in llm.stream(messages):
            final = chunk if final is None else final + chunk
    else:
        final = llm.invoke(messages)
    assert final.content == ANSWER and not final.tool_calls
    assert all(piece in net.prompts[-1] for piece in RENDERED[fmt])


@pytest.mark.parametrize("choice", ["required", "named"])
def test_tool_choice_forces_a_call(served, choice):
    import openai

    fmt, server, net = served
    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_weather"}}
    if choice == "required":
        # the forced start leaves the name to the model: script it to write the rest of the call
        reply = {"harmony": "get_weather <|constrain|>json<|message|>{\"city\": \"Oslo\"}",
                 "hermes": "get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
                 "llama3": "get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
                 "generic": "get_weather\", \"arguments\": {\"city\": \"Oslo\"}}}"}[fmt]
        net.script, old = (lambda prompt: reply), net.script
    else:
        old = net.script
    try:
        out = client.chat.completions.create(model=server.worker.model_id, tools=TOOLS, tool_choice=tool_choice,
                                             messages=[{"role": "user", "content": "FORCE a call"}], max_tokens=100)
    finally:
        net.script = old
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Oslo"}


def test_tool_choice_none_renders_no_tools_and_parses_no_calls(served):
    import openai

    fmt, server, net = served
    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    out = client.chat.completions.create(model=server.worker.model_id, tools=TOOLS, tool_choice="none",
                                         messages=QUESTION, max_tokens=200)
    assert not out.choices[0].message.tool_calls and out.choices[0].finish_reason == "stop"
    assert TOOLS_RENDERED[fmt] not in net.prompts[-1]
    if fmt != "harmony":  # the scripted call comes back as text
        assert out.choices[0].message.content == CALLS[fmt]


UNIT_TOOL = [{"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "required": ["unit"], "additionalProperties": False,
    "properties": {"unit": {"enum": ["C", "F"]}}}}}]


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_call_is_grammar_constrained(served, choice):
    """A model that will not write a call still returns one that validates against the function's schema."""
    import openai

    fmt, server, net = served
    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "set_unit"}}
    net.script, old = (lambda prompt: "I refuse to call anything."), net.script
    try:
        out = client.chat.completions.create(model=server.worker.model_id, tools=UNIT_TOOL,
                                             tool_choice=tool_choice, max_tokens=60,
                                             messages=[{"role": "user", "content": "Use Celsius."}])
    finally:
        net.script = old
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1, out
    assert calls[0].function.name == "set_unit" and json.loads(calls[0].function.arguments)["unit"] in ("C", "F")


def test_gpt_oss_reasoning_effort_with_tools(served):
    import openai

    fmt, server, net = served
    if fmt != "harmony":
        pytest.skip("GPT-OSS only")
    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    out = client.chat.completions.create(model=server.worker.model_id, tools=TOOLS, messages=QUESTION,
                                         reasoning_effort="high", max_tokens=200)
    assert "Reasoning: high" in net.prompts[-1] and TOOLS_RENDERED[fmt] in net.prompts[-1]
    assert out.choices[0].finish_reason == "tool_calls"
    assert out.choices[0].message.model_extra["reasoning_content"] == "Need the weather tool."
