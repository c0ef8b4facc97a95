"""response_format json_object / json_schema: the grammar engine's mask makes every answer parse and validate."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.scripted_model import scripted_model
from tests.server_helpers import LiveServer
from worker_orcd.server import ServeConfig

SCHEMA = {"type": "object", "required": ["name", "age", "city"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "city": {"enum": ["Paris", "Oslo", "Lima"]}}}
ASK = [{"role": "user", "content": "Invent a person: their name, age and home city, as JSON."}]


@pytest.fixture(scope="module")
def server():
    import worker_orcd

    model = worker_orcd.load(device="cpu")
    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=512, max_batch=8, max_tokens_out=256)
    with LiveServer(model, cfg) as s:
        yield s


def test_twenty_sampled_answers_parse_and_validate(server):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}

    def ask(seed: int) -> dict:
        body = {"messages": ASK, "response_format": fmt, "temperature": 1.0, "seed": seed, "max_tokens": 120}
        r = httpx.post(server.uri + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, range(20)))
    answers = []
    for c in choices:
        assert c["finish_reason"] == "stop", c
        value = json.loads(c["message"]["content"])
        jsonschema.validate(value, SCHEMA)
        answers.append(value)
    assert len({json.dumps(a, sort_keys=True) for a in answers}) > 1  # sampled, not one answer repeated


def test_json_object_through_the_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    # greedy, a 135M model may repeat a key until max_tokens (seen on the emulated AVX2 path): a frequency
    # penalty, as a client would set, lets the object close
    out = client.chat.completions.create(model=server.worker.model_id, messages=ASK, max_tokens=120,
                                         temperature=0, frequency_penalty=1.0, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    chunks = list(client.chat.completions.create(model=server.worker.model_id, messages=ASK, max_tokens=120,
                                                 temperature=0, frequency_penalty=1.0,
                                                 response_format={"type": "json_object"}, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content


def test_bad_schema_and_tools_with_json_are_400(server):
    import openai

    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.worker.model_id, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.worker.model_id, messages=ASK, response_format={
            "type": "json_object"}, tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.param == "response_format"


def test_constraint_masks_what_is_not_json(smollm2_path):
    from worker_orcd.server.structured import GrammarConstraint
    from worker_orcd.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    c = GrammarConstraint(tok, 0, schema=SCHEMA)
    masked = c(torch.zeros(tok.vocab_size), [])
    allowed = {tok.detokenize([i]) for i in torch.nonzero(masked == 0).flatten().tolist()}
    assert allowed and all(a.lstrip().startswith("{") or a.strip() == "" for a in allowed), sorted(allowed)[:20]
    assert not any(i in tok.eog_ids for i in torch.nonzero(masked == 0).flatten().tolist())


def test_gpt_oss_answers_json_in_its_final_channel():
    model = scripted_model("harmony", lambda prompt: "{\"name\": \"Ada\", \"age\": 36, \"city\": \"Oslo\"}")
    cfg = ServeConfig(host="127.0.0.1", port=0, ctx=4096, max_batch=1, prefill_chunk=4096, max_tokens_out=128)
    with LiveServer(model, cfg) as s:
        body = {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}
        r = httpx.post(s.uri + "/v1/chat/completions", json=body, timeout=120).json()
    msg = r["choices"][0]["message"]
    assert json.loads(msg["content"]) == {"name": "Ada", "age": 36, "city": "Oslo"} and msg["reasoning_content"] == ""
    assert model.net.prompts[-1].endswith("<|start|>assistant<|channel|>final<|message|>")


def test_small_model_forced_to_call_returns_a_valid_call(server):
    """tool_choice required on the real SmolLM2 (generic format): the grammar makes its reply a valid call."""
    import jsonschema
    import openai

    params = {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
              "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                "parameters": params}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    for seed in range(3):
        out = client.chat.completions.create(model=server.worker.model_id, tools=tools, tool_choice="required",
                                             messages=[{"role": "user", "content": "Weather in Paris?"}],
                                             temperature=0.8, seed=seed, max_tokens=80)
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1, out
        if calls[0].function.name == "get_weather":
            jsonschema.validate(json.loads(calls[0].function.arguments), params)
        else:
            assert isinstance(json.loads(calls[0].function.arguments), dict)


def test_vllm_structured_outputs_regex_choice_grammar(server):
    import re

    import openai

    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    m = server.worker.model_id
    out = client.completions.create(model=m, prompt="My phone number is", max_tokens=20, temperature=0.9, seed=1,
                                    extra_body={"structured_outputs": {"regex": r" \d{3}-\d{4}"}})
    assert re.fullmatch(r" \d{3}-\d{4}", out.choices[0].text) and out.choices[0].finish_reason == "stop", out
    for seed in range(3):
        out = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Pick a colour"}],
                                             max_tokens=10, temperature=1.0, seed=seed,
                                             extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
        assert out.choices[0].message.content in ("red", "green", "blue")
    ebnf = 'root ::= "yes" | "no" | "maybe, " [0-9] "%"'
    out = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Will it rain?"}],
                                         max_tokens=10, temperature=1.0, seed=3,
                                         extra_body={"structured_outputs": {"grammar": ebnf}})
    assert re.fullmatch(r"yes|no|maybe, [0-9]%", out.choices[0].message.content)


@pytest.mark.parametrize("extra,param", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= nothing_defined"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["b"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
])
def test_bad_structured_outputs_are_400(server, extra, param):
    import openai

    client = openai.OpenAI(base_url=server.uri + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.worker.model_id, messages=ASK, max_tokens=4, extra_body=extra)
    assert e.value.param == param
