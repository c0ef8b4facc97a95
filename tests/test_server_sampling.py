"""Issue 15 item 3 end to end on the default model (CPU): logprobs and echo against the model's own logits,
n choices, logit_bias, penalties, min_p, stop_token_ids, ignore_eos, through the openai client.

References are computed here, independently of the scheduler and the sampler: the model's forward run the
way the scheduler runs it for one sequence (the prompt in one forward with the last row's logits, then one
row per token), log_softmax and the penalties' formulas in float64.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.server_helpers import LiveServer, sse_events
from worker_orcd.server import ServeConfig

M = "SmolLM2-135M-Instruct.Q4_1"
PROMPT = "The capital of France is"
MSGS = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def model():
    import worker_orcd

    return worker_orcd.load(device="cpu")


@pytest.fixture(scope="module")
def server(model):
    with LiveServer(model, ServeConfig(host="127.0.0.1", port=0, ctx=1024, max_batch=8, max_tokens_out=256)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.uri + "/v1", api_key="unused", timeout=300)


def prompt_ids(server, **body) -> list[int]:
    return httpx.post(server.uri + "/tokenize", json=body, timeout=60).json()["tokens"]


def reference_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], rep: float, pres: float,
                        freq: float) -> torch.Tensor:
    """vLLM's / HF's formulas on one row, float64, written out per id."""
    out = logits.clone()
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


def greedy_reference(model, ids: list[int], steps: int, penalties: tuple[float, float, float] | None = None,
                     stop_at_eog: bool = True) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's raw logits (float64), decoded as the scheduler decodes one sequence."""
    net = model.net
    kv = net.new_kv_cache(1024)
    logits = net.forward(torch.tensor(ids), torch.arange(len(ids)), kv, logit_rows=torch.tensor([len(ids) - 1]))[-1]
    tokens, rows = [], []
    for i in range(steps):
        row = logits.double()
        rows.append(row)
        picked = reference_penalties(row, ids, tokens, *penalties) if penalties else row
        tokens.append(int(picked.argmax()))
        if stop_at_eog and tokens[-1] in model.tokenizer.eog_ids:
            break
        logits = net.forward(torch.tensor([tokens[-1]]), torch.tensor([len(ids) + i]), kv)[-1]
    return tokens, rows


def test_chat_logprobs_equal_log_softmax_of_the_models_logits(server, model, client):
    r = client.chat.completions.create(model=M, messages=MSGS, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    tokens, rows = greedy_reference(model, prompt_ids(server, messages=MSGS), 10)
    piece = model.tokenizer.piece
    assert b"".join(bytes(c.bytes) for c in content) == b"".join(piece(t) for t in tokens)
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c, token, row in zip(content, tokens, rows):
        ref = torch.log_softmax(row, -1)
        top = ref.topk(5)
        assert bytes(c.bytes) == piece(token) and abs(c.logprob - float(ref[token])) < 1e-4
        assert [bytes(t.bytes) for t in c.top_logprobs] == [piece(int(i)) for i in top.indices]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)  # greedy: the chosen is the top
        assert c.token == piece(token).decode("utf-8", "replace")


def test_chat_logprobs_stream_like_the_response(server, client):
    kw = dict(model=M, messages=MSGS, max_tokens=12, temperature=0.9, seed=3, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [c for ch in chunks for choice in ch.choices if choice.logprobs for c in choice.logprobs.content]
    assert [(c.token, c.logprob, [t.token for t in c.top_logprobs]) for c in streamed] == \
        [(c.token, c.logprob, [t.token for t in c.top_logprobs]) for c in full]
    assert all(len(c.top_logprobs) == 2 for c in full)


def long_prompt() -> str:
    """~600 tokens: three prompt chunks of the server (prefill_chunk 256), past one attention key block (512)."""
    from pathlib import Path

    return (Path(__file__).parent / "data" / "ppl_text.txt").read_text(encoding="utf-8")[:2600]


@pytest.mark.parametrize("prompt", [PROMPT, "long"])
def test_echo_prompt_logprobs_equal_log_softmax_of_model_logits(server, model, client, prompt):
    """What lm-evaluation-harness's loglikelihood tasks send: echo, max_tokens 0, logprobs k. The served rows are
    model.logits' rows, whatever chunks the scheduler cut the prompt into."""
    prompt = long_prompt() if prompt == "long" else prompt
    ids = prompt_ids(server, prompt=prompt)
    r = client.completions.create(model=M, prompt=prompt, echo=True, max_tokens=0, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = torch.log_softmax(model.logits(ids).double(), -1)  # row j predicts token j + 1
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        top = ref[j - 1].topk(3)
        want = {model.tokenizer.piece(int(i)).decode("utf-8", "replace"): float(v) for i, v in zip(*top[::-1])}
        for text, v in want.items():
            assert lp.top_logprobs[j][text] == pytest.approx(v, abs=1e-4)
        assert lp.top_logprobs[j][lp.tokens[j]] == lp.token_logprobs[j]  # the prompt's own token is listed
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(ids))]


def test_echo_with_generation_and_token_prompt(server, model, client):
    ids = prompt_ids(server, prompt=PROMPT)
    r = client.completions.create(model=M, prompt=ids, echo=True, max_tokens=3, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    tokens, rows = greedy_reference(model, ids, 3)
    assert r.choices[0].text == model.tokenizer.detokenize(ids) + model.tokenizer.detokenize(tokens)
    assert len(lp.tokens) == len(ids) + 3 and r.usage.completion_tokens == 3
    for j, (token, row) in enumerate(zip(tokens, rows)):
        assert lp.token_logprobs[len(ids) + j] == pytest.approx(float(torch.log_softmax(row, -1)[token]), abs=1e-4)
    # lm-evaluation-harness's other form: max_tokens 1, the last entry dropped by the caller
    one = client.completions.create(model=M, prompt=PROMPT, echo=True, max_tokens=1, logprobs=1, temperature=0)
    assert one.choices[0].logprobs.token_logprobs[:len(ids)] == lp.token_logprobs[:len(ids)]


def test_completion_logprobs_stream(server):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    full = httpx.post(server.uri + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    with httpx.stream("POST", server.uri + "/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
        chunks = [d for _, d in sse_events(resp) if d != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    joined = {k: [v for p in parts for v in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert text == full["text"] and joined == full["logprobs"]


def test_n_greedy_choices_all_equal_the_single_answer(client):
    one = client.chat.completions.create(model=M, messages=MSGS, max_tokens=12, temperature=0)
    three = client.chat.completions.create(model=M, messages=MSGS, max_tokens=12, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.message.content == one.choices[0].message.content for c in three.choices)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_seeded_choice_i_equals_seed_plus_i_alone(client):
    kw = dict(model=M, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95)
    three = client.completions.create(n=3, seed=41, **kw)
    alone = [client.completions.create(seed=41 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in three.choices] == alone
    assert len(set(alone)) > 1  # the choices are samples, not copies


def test_n_streams_every_choice(server, client):
    kw = dict(model=M, messages=MSGS, max_tokens=10, temperature=0.8, seed=5, n=2)
    full = client.chat.completions.create(**kw)
    texts = ["", ""]
    finish = [None, None]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in full.choices]
    assert finish == [c.finish_reason for c in full.choices]


def test_logit_bias_removes_and_forces_tokens(server, model, client):
    ids = prompt_ids(server, prompt=PROMPT)
    (first,), _ = greedy_reference(model, ids, 1)
    base = dict(model=M, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0)
    plain = client.completions.create(**base).choices[0].logprobs.tokens[0]
    assert plain.encode() == model.tokenizer.piece(first)
    removed = client.completions.create(logit_bias={str(first): -100}, **base).choices[0].logprobs.tokens[0]
    assert removed != plain
    forced_id = model.tokenizer.tokenize(" banana")[0]
    forced = client.completions.create(logit_bias={str(forced_id): 100}, **base).choices[0]
    assert forced.logprobs.tokens[0].encode() == model.tokenizer.piece(forced_id)
    # logprobs stay the model's: the forced token's is what the model gives it, not ~0
    assert forced.logprobs.token_logprobs[0] < -1.0
    # a bias past 100 is clamped (as vLLM does), not refused
    assert client.completions.create(logit_bias={str(first): -1e6}, **base).choices[0].logprobs.tokens[0] == removed


def test_penalties_match_the_reference_formulas(server, model):
    ids = prompt_ids(server, prompt="Repeat after me: the cat, the cat, the cat,")
    steps = 16
    for rep, pres, freq in [(1.3, 0.0, 0.0), (1.0, 0.6, 0.4), (1.15, -0.5, 1.0)]:
        r = httpx.post(server.uri + "/v1/completions", timeout=120, json={
            "prompt": ids, "max_tokens": steps, "temperature": 0, "logprobs": 0, "repetition_penalty": rep,
            "presence_penalty": pres, "frequency_penalty": freq}).json()
        got = r["choices"][0]["logprobs"]["tokens"]
        tokens, _ = greedy_reference(model, ids, steps, (rep, pres, freq))
        assert got == [model.tokenizer.piece(t).decode("utf-8", "replace") for t in tokens], (rep, pres, freq)
    plain, _ = greedy_reference(model, ids, steps)
    assert tokens != plain  # the penalties changed the text


def test_min_p_one_keeps_only_the_top_token(client):
    kw = dict(model=M, messages=MSGS, max_tokens=12)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    hot = client.chat.completions.create(temperature=1.8, seed=1, extra_body={"min_p": 1.0}, **kw)
    assert hot.choices[0].message.content == greedy


def test_stop_token_ids_stop_and_ignore_eos_continues(server, model):
    ids = prompt_ids(server, prompt=PROMPT)
    tokens, _ = greedy_reference(model, ids, 6)
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    r = httpx.post(server.uri + "/v1/completions", json={**body, "stop_token_ids": [tokens[2]]}, timeout=120).json()
    want = model.tokenizer.stream_decoder(continuation=True)
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 3
    assert r["choices"][0]["text"] == "".join(want.push(t) for t in tokens[:2]) + want.flush()

    chat = {"messages": [{"role": "user", "content": "Reply with just the word yes."}], "temperature": 0,
            "max_tokens": 40}
    short = httpx.post(server.uri + "/v1/chat/completions", json=chat, timeout=120).json()
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 40
    long = httpx.post(server.uri + "/v1/chat/completions", json={**chat, "ignore_eos": True}, timeout=120).json()
    assert long["choices"][0]["finish_reason"] == "length" and long["usage"]["completion_tokens"] == 40
    assert long["choices"][0]["message"]["content"].startswith(short["choices"][0]["message"]["content"])
    assert "<|im_end|>" not in long["choices"][0]["message"]["content"]  # an ignored end adds no text


@pytest.mark.parametrize("change,param", [
    ({"n": 9}, "n"),  # more than --max-batch
    ({"logprobs": 21}, "logprobs"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),  # the vocabulary has 49,152 ids
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"stop_token_ids": [49152]}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"),  # without echo
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"best_of": 3}, "best_of"),
])
def test_invalid_sampling_fields_are_openai_400s(client, change, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="hi", max_tokens=change.pop("max_tokens", 2),
                                  extra_body=change)
    assert e.value.param == param and e.value.type == "invalid_request_error"


def test_worker_api_takes_the_same_sampling_fields(server, model):
    ids = prompt_ids(server, prompt=PROMPT)
    tokens, _ = greedy_reference(model, ids, 6, (1.2, 0.0, 0.5))
    body = {"job_id": "pen-1", "prompt": PROMPT, "max_tokens": 6, "temperature": 0.0, "repetition_penalty": 1.2,
            "frequency_penalty": 0.5, "stop_token_ids": [tokens[3]]}
    with httpx.stream("POST", server.uri + "/execute", json=body, timeout=120) as resp:
        events = list(sse_events(resp))
    end = next(d for name, d in events if name == "end")
    want = model.tokenizer.stream_decoder(continuation=True)
    assert end["tokens_out"] == 4 and end["stop_reason"] == "eos"
    assert "".join(d["t"] for name, d in events if name == "token") == "".join(want.push(t) for t in tokens[:3]) + \
        want.flush()
    bad = httpx.post(server.uri + "/execute", json={**body, "job_id": "pen-2", "logit_bias": {"x": 1}}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "logit_bias"


def test_langchain_reads_logprobs_and_n_choices(server, client):
    """A second client library: langchain-openai's ChatOpenAI gets the same logprobs and n choices."""
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.uri + "/v1", api_key="unused", model=M, max_tokens=8, temperature=0,
                     logprobs=True, top_logprobs=2, n=2)
    result = llm.generate([[HumanMessage(MSGS[0]["content"])]])
    gens = result.generations[0]
    want = client.chat.completions.create(model=M, messages=MSGS, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=2)
    assert len(gens) == 2 and all(g.text == want.choices[0].message.content for g in gens)
    got = gens[0].generation_info["logprobs"]["content"]
    assert [(c["token"], c["logprob"]) for c in got] == \
        [(c.token, c.logprob) for c in want.choices[0].logprobs.content]
