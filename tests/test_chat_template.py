"""Chat templates against transformers' apply_chat_template; GPT-OSS harmony rendering and parsing."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from tests.shared_data import TEMPLATES_DIR as TEMPLATES
from tests.shared_data import VOCAB_DIR
from worker_orcd.packaged import default_model_path
from worker_orcd.tokenizer import TokenizerError, load_tokenizer
from worker_orcd.tokenizer.chat import render_chat_template
from worker_orcd.tokenizer.harmony import HarmonyParser, ToolCall, parse_header

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And <b>3+3</b> & \"quotes\"?"},
]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string", "description": "City name"}}},
    },
}]


def transformers_render(tok, template: str, messages, **kwargs) -> str:
    transformers = pytest.importorskip("transformers")
    # Rendering reads only the template and the bos/eos strings, so a three-token vocabulary will do.
    bos, eos = tok.token_text(tok.bos_id), tok.token_text(tok.eos_id)
    vocab = {"<unk>": 0, bos: 1, eos: 2}
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer(models.WordLevel(vocab, unk_token="<unk>")), chat_template=template,
        bos_token=bos, eos_token=eos)
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


def template_cases():
    from worker_orcd.packaged import default_model_path

    return [
        ("smollm2-embedded", lambda: load_tokenizer(default_model_path()), None),
        ("llama-3.1", lambda: load_tokenizer(VOCAB_DIR / "ggml-vocab-llama-bpe.gguf"),
         TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja"),
        ("qwen2.5", lambda: load_tokenizer(VOCAB_DIR / "ggml-vocab-qwen2.gguf"),
         TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja"),
        ("gpt-oss", lambda: load_tokenizer(VOCAB_DIR / "ggml-vocab-gpt-2.gguf"),
         TEMPLATES / "openai-gpt-oss-120b.jinja"),
    ]


@pytest.mark.parametrize("name, make_tokenizer, template_path", template_cases(),
                         ids=[c[0] for c in template_cases()])
def test_templates_render_like_transformers(name, make_tokenizer, template_path):
    tok = make_tokenizer()
    if template_path is not None:
        tok.chat_template = template_path.read_text(encoding="utf-8")
    assert tok.chat_template
    for add_generation_prompt in (True, False):
        ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
        theirs = transformers_render(tok, tok.chat_template, CONVERSATION,
                                     add_generation_prompt=add_generation_prompt)
        assert ours == theirs
    if name != "smollm2-embedded":  # the others take tools (rendered through tojson)
        ours = tok.apply_chat_template(CONVERSATION[1:2], tools=TOOLS)
        assert ours == transformers_render(tok, tok.chat_template, CONVERSATION[1:2], tools=TOOLS,
                                           add_generation_prompt=True)
        assert "get_weather" in ours


def test_template_helpers():
    assert render_chat_template("{{ x|tojson }}", [], x="<a>&'é") == json.dumps("<a>&'é", ensure_ascii=False)
    assert render_chat_template("{{ x|tojson(indent=2) }}", [], x={"a": 1}) == '{\n  "a": 1\n}'
    assert len(render_chat_template("{{ strftime_now('%Y') }}", [])) == 4
    # trim_blocks and lstrip_blocks, as transformers sets them
    assert render_chat_template("  {% if true %}\nA\n  {% endif %}\nB", []) == "A\nB"
    with pytest.raises(TokenizerError, match="bad role"):
        render_chat_template("{{ raise_exception('bad role') }}", [])
    with pytest.raises(TokenizerError):  # the sandbox refuses attribute escapes
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(TokenizerError, match="does not parse"):
        render_chat_template("{% if %}", [])


BENIGN_TEMPLATES = [
    "{% for m in messages %}{{ '<|' + m.role + '|>' ~ m.content|trim ~ '\\n' }}{% endfor %}",
    "{{ messages|map(attribute='role')|join(', ') }} {{ messages|length * 2 }} {{ 2 ** 10 }}",
    "{{ '%05d|%-4s' % (42, 'ab') }} {{ '%(a)s' % {'a': 1} }}",
    "{{ '{:>8}|{}'.format('x', 3) }} {{ 'a-b'.replace('-', '+') }} {{ 'x'.center(7) }} {{ 'ab' * 3 }}",
    "{% macro row(m) %}[{{ m.role|upper }}]{% endmacro %}{% for m in messages %}{{ row(m) }}{% endfor %}",
    "{% set block %}{% for m in messages %}{{ loop.index }}{% endfor %}{% endset %}{{ block|length }}:{{ block }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content|length %}{% endfor %}"
    "{{ ns.n }}",
    "{{ messages[::-1]|map(attribute='content')|list }} {{ (range(5)|list)[1:3] }} {{ 'abc'[::-1] }}",
    "{{ messages|tojson }} {{ 'a\tb'.expandtabs(4) }} {{ '%s'|format('y') }} {{ ('w ' * 2)|wordwrap(3) }}",
    "{% autoescape true %}{{ '<b>' ~ messages[0].content }}{% endautoescape %} {{ '<i>' ~ 1 }}",
    "{{ [1, 2] + [3] }} {{ 7 * 6 }} {{ 1.5 * 2 }} {{ -3 ** 2 }} {{ 'abc' % () if false else 'z' }}",
    "{% for b in range(7)|batch(3, 0) %}{{ b }}{% endfor %} {% for s in range(7)|slice(2) %}{{ s }}{% endfor %}",
    "{{ 'line\nline'|indent(2, true) }} {{ 'long text here'|truncate(9, true) }} {{ 'x'|center(5) }}",
]


@pytest.mark.parametrize("template", BENIGN_TEMPLATES)
def test_limits_do_not_change_what_templates_render(template):
    # the guarded sandbox renders what jinja2's ImmutableSandboxedEnvironment renders, filters and `~` included
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from worker_orcd.tokenizer.chat import _tojson

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson  # HF's, as ours
    messages = [{"role": "user", "content": " Hi <there> "}, {"role": "assistant", "content": "Hello."}]
    want = env.from_string(template).render(messages=messages, tools=None, add_generation_prompt=True)
    assert render_chat_template(template, messages) == want


def calls_per_render(tok, messages) -> int:
    """Python and C function calls made on this thread by one render (after a first one warmed the caches)."""
    tok.apply_chat_template(messages)
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(profile)
    try:
        tok.apply_chat_template(messages)
    finally:
        sys.setprofile(None)
    return calls


def test_normal_rendering_stays_cheap(record_property):
    """The sandbox's limits cost a bounded amount of work per message, linear in the conversation (counted in
    function calls, not seconds; the time per render is bench/unit_timings.py's: ~0.6 ms for 16 messages)."""
    tok = load_tokenizer(default_model_path())
    short, long = calls_per_render(tok, CONVERSATION * 4), calls_per_render(tok, CONVERSATION * 16)
    record_property("calls_16_messages", short)
    # measured 1,530 calls for 16 messages (jinja2 3.1) and 3.8x that for 4x the messages
    assert short < 3000, f"{short} calls to render 16 messages"
    assert long < 4.5 * short, f"{long} calls for 64 messages against {short} for 16: not linear"


def test_no_template_is_an_error():
    tok = load_tokenizer(VOCAB_DIR / "ggml-vocab-gpt-2.gguf")
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CONVERSATION)


HARMONY_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "thinking": "I should call the tool.",
     "tool_calls": [{"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "21 degrees."},
    {"role": "user", "content": "Thanks!"},
]


def test_harmony_render():
    template = (TEMPLATES / "openai-gpt-oss-120b.jinja").read_text(encoding="utf-8")
    text = render_chat_template(template, HARMONY_CONVERSATION, tools=TOOLS, reasoning_effort="low")
    assert text.startswith("<|start|>system<|message|>")
    assert "Reasoning: low" in text
    assert "<|start|>assistant to=functions.get_weather<|channel|>commentary" in text
    assert "<|start|>assistant<|channel|>final<|message|>21 degrees.<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Thanks!<|end|><|start|>assistant")
    tok = load_tokenizer(VOCAB_DIR / "ggml-vocab-gpt-2.gguf")
    theirs = transformers_render(tok, template, HARMONY_CONVERSATION, tools=TOOLS, reasoning_effort="low",
                                 add_generation_prompt=True)
    assert text == theirs


GENERATED = (
    "<|channel|>analysis<|message|>User wants weather. Use <tool>.<|end|>"
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    "{\"city\": \"Paris\"}<|call|>"
)
ANSWER = ("<|channel|>analysis<|message|>2+2 is 4.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>4 <|return|>")


def test_harmony_parser_channels_and_tool_calls():
    p = HarmonyParser()
    deltas = p.feed(ANSWER) + p.finish()
    assert p.analysis == "2+2 is 4." and p.final == "4 "
    assert [(d.channel, d.text) for d in deltas] == [("analysis", "2+2 is 4."), ("final", "4 ")]
    assert [m.stop for m in p.messages] == ["<|end|>", "<|return|>"]

    p = HarmonyParser()
    p.feed(GENERATED)
    assert p.analysis == "User wants weather. Use <tool>."
    assert p.tool_calls == [ToolCall("get_weather", "{\"city\": \"Paris\"}")]
    call = p.messages[-1]
    assert (call.channel, call.recipient, call.content_type, call.stop) == \
           ("commentary", "functions.get_weather", "json", "<|call|>")


def test_harmony_parser_closed_by_end_of_generation_token():
    # <|call|> and <|return|> end generation, so the engine passes them to finish() instead of feed()
    p = HarmonyParser()
    p.feed(GENERATED.removesuffix("<|call|>"))
    assert p.tool_calls == []  # not closed yet: the arguments may be incomplete
    p.finish("<|call|>")
    assert p.tool_calls == [ToolCall("get_weather", "{\"city\": \"Paris\"}")]


def test_harmony_header_forms():
    m = parse_header("<|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>json")
    assert (m.role, m.channel, m.recipient, m.content_type) == \
           ("assistant", "commentary", "functions.lookup", "json")
    m = parse_header("<|channel|>final")
    assert (m.role, m.channel, m.recipient) == ("assistant", "final", None)


def test_harmony_parser_holds_back_partial_markers():
    p = HarmonyParser()
    assert [d.text for d in p.feed("<|channel|>final<|message|>a <")] == ["a "]  # "<" may start <|end|>
    assert [d.text for d in p.feed(" b<|en")] == ["< b"]
    assert p.feed("d|>") == [] and p.messages[-1].stop == "<|end|>"


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(0, len(GENERATED + ANSWER) + 20), max_size=12))
def test_harmony_parser_streaming_equals_whole(cuts):
    text = GENERATED + "<|start|>assistant" + ANSWER
    whole = HarmonyParser()
    whole.feed(text)
    whole.finish()
    streamed = HarmonyParser()
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    deltas = []
    for a, b in zip(bounds, bounds[1:]):
        deltas += streamed.feed(text[a:b])
    deltas += streamed.finish()
    assert streamed.messages == whole.messages
    for channel in ("analysis", "commentary", "final"):
        joined = "".join(d.text for d in deltas if d.channel == channel)
        assert joined == "".join(m.content for m in whole.messages if m.channel == channel)


def test_harmony_parser_on_decoded_tokens():
    # the engine feeds StreamDecoder output; harmony markers are rendered text, so they parse the same
    tok = load_tokenizer(VOCAB_DIR / "ggml-vocab-gpt-2.gguf")
    ids = tok.tokenize(ANSWER)
    dec, p = tok.stream_decoder(), HarmonyParser()
    for i in ids:
        p.feed(dec.push(i))
    p.feed(dec.flush())
    p.finish()
    assert (p.analysis, p.final) == ("2+2 is 4.", "4 ")
