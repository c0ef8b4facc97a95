"""Tokenizer: llama.cpp's conformance vectors, real models against llama.cpp, special tokens, streaming."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.shared_data import VOCAB_DIR
from worker_orcd.tokenizer import StreamDecoder, Tokenizer, TokenizerError, load_tokenizer
from worker_orcd.tokenizer.pieces import gpt2_byte_decoder
from worker_orcd.tokenizer.vocab import read_vocab

VOCABS = ["gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2"]
DATA = Path(__file__).parent / "data"


@cache
def vocab_tokenizer(name: str) -> Tokenizer:
    return load_tokenizer(VOCAB_DIR / f"ggml-vocab-{name}.gguf")


@cache
def model_tokenizer(name: str) -> Tokenizer:
    from worker_orcd.packaged import default_model_path, gemma3_270m_path

    return load_tokenizer(default_model_path() if name == "smollm2" else gemma3_270m_path())


def conformance_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp tests/test-tokenizer-0 format: inputs split by the separator, one id line per input."""
    path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    raw = path.with_name(path.name + ".inp").read_text(encoding="utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")
    if inputs and inputs[-1] == "":  # the file ends with a separator, which starts no test
        inputs.pop()
    lines = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, lines)]


def needs_vocab(name: str):
    return pytest.mark.skipif(not (VOCAB_DIR / f"ggml-vocab-{name}.gguf").is_file(),
                              reason=f"{VOCAB_DIR}/ggml-vocab-{name}.gguf is not present")


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_vocab(n)) for n in VOCABS])
def test_conformance_vectors(name):
    # test-tokenizer-0 calls common_tokenize(ctx, text, add_special=false, parse_special=false).
    tok = vocab_tokenizer(name)
    cases = conformance_cases(name)
    assert len(cases) == 46
    failed = [(text, tok.tokenize(text), want) for text, want in cases if tok.tokenize(text) != want]
    assert not failed, f"{len(failed)}/{len(cases)} differ from llama.cpp: {failed[:3]}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_vocab(n)) for n in VOCABS])
def test_conformance_detokenizes_back(name):
    tok = vocab_tokenizer(name)
    for text, ids in conformance_cases(name):
        assert tok.detokenize(ids) == text


def llamacpp_cases(model: str) -> list[dict]:
    path = DATA / "llamacpp" / f"tokens_{model}.json"
    if not path.is_file():
        pytest.skip(f"{path} is not there yet (written by the llama.cpp reference script)")
    return json.loads(path.read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_models_match_llamacpp(model):
    cases = llamacpp_cases(model)
    tok = model_tokenizer(model)
    mismatches = []
    for case in cases:
        text = case["text"]
        got = {
            "ids_plain": tok.tokenize(text),
            "ids_special": tok.tokenize(text, parse_special=True),
            "ids_bos": tok.tokenize(text, add_special=True),
        }
        mismatches += [(field, text, ids, case[field]) for field, ids in got.items() if ids != case[field]]
        if "detok_plain_hex" in case:
            # llama.cpp's detokenize(special=False) leaves out control tokens, as skip_special does.
            plain = tok.pieces(case["ids_plain"], skip_special=True)
            if b"".join(plain).hex() != case["detok_plain_hex"]:
                mismatches.append(("detok_plain", text, b"".join(plain), case["detok_plain_hex"]))
        if "detok_special_hex" in case:
            special = b"".join(tok.pieces(case["ids_special"]))
            if special.hex() != case["detok_special_hex"]:
                mismatches.append(("detok_special", text, special, case["detok_special_hex"]))
    assert not mismatches, f"{len(mismatches)} differ from llama.cpp: {mismatches[:3]}"


FUZZ = DATA / "tokenizer" / "llamacpp_fuzz.json"


@pytest.mark.parametrize("name", [*VOCABS, "smollm2", "gemma3"])
def test_random_texts_match_llamacpp(name):
    # mixed scripts, odd whitespace (NBSP, U+3000, U+0085) and special-token strings, from make_fuzz_refs.py
    refs = json.loads(FUZZ.read_text(encoding="utf-8"))
    tok = model_tokenizer(name) if name in ("smollm2", "gemma3") else vocab_tokenizer(name)
    plain, special = refs["ids"][name]
    cases = list(zip(refs["texts"], plain, special))
    failed = [(t, s) for t, want_plain, want_special in cases
              for s, want in ((False, want_plain), (True, want_special))
              if tok.tokenize(t, parse_special=s) != want]
    assert not failed, f"{len(failed)} of {2 * len(cases)} differ from llama.cpp, e.g. {failed[:3]}"


def tiny_vocab_meta(pre: str, extra_tokens: list[str] = (), merges: list[str] = ()) -> dict:
    """A byte-level vocabulary of the 256 byte characters (plus extra control tokens), no merges."""
    chars = list(gpt2_byte_decoder())
    tokens = chars + list(extra_tokens)
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(chars) + [3] * len(extra_tokens),
        "tokenizer.ggml.merges": list(merges),
    }


def test_unknown_pre_type_is_refused():
    with pytest.raises(TokenizerError, match="'no-such-pre'"):
        read_vocab(tiny_vocab_meta("no-such-pre"))


@pytest.mark.parametrize("pre, text, words", [
    ("gpt-2", "Hello World's 12345  x", ["Hello", " World", "'s", " 12345", " ", " x"]),
    ("phi-2", "a  b", ["a", " ", " b"]),
    ("llama-bpe", "Hello World's 12345\n\n x", ["Hello", " World", "'s", " ", "123", "45", "\n\n", " x"]),
    ("qwen2", "ab 123", ["ab", " ", "1", "2", "3"]),
    ("stablelm2", "ab 123", ["ab", " ", "1", "2", "3"]),
    ("smollm", "ab 123", ["ab", " ", "1", "2", "3"]),
    ("gpt-4o", "Hello WORLDs World's 12345 a/b\n",
     ["Hello", " WORLDs", " World's", " ", "123", "45", " a", "/b", "\n"]),
    ("gpt-4o", "ÉcoleÀ", ["École", "À"]),
    ("default", "a+=b 1234", ["a", "+=", "b", " ", "123", "4"]),
])
def test_pre_tokenizer_splits(pre, text, words):
    tok = Tokenizer.from_vocab(read_vocab(tiny_vocab_meta(pre)))
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text
    decoder = gpt2_byte_decoder()
    split = tok.hf_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    assert [bytes(decoder[c] for c in word).decode() for word, _ in split] == words


def test_special_tokens_parse_only_on_request():
    tok = model_tokenizer("smollm2")
    text = "<|im_start|>user\nhi<|im_end|>"
    special = tok.tokenize(text, parse_special=True)
    assert special[0] == tok.token_id("<|im_start|>") and special[-1] == tok.token_id("<|im_end|>")
    plain = tok.tokenize(text)
    assert tok.token_id("<|im_start|>") not in plain and len(plain) > len(special)
    assert tok.detokenize(special) == text
    assert tok.detokenize(special, skip_special=True) == "user\nhi"


def test_add_special_follows_gguf_flags():
    spm = vocab_tokenizer("llama-spm")  # add_bos_token true
    assert spm.add_bos and spm.tokenize("Hello", add_special=True)[0] == spm.bos_id == 1
    assert spm.tokenize("", add_special=True) == [1]
    smol = model_tokenizer("smollm2")  # add_bos_token false
    assert not smol.add_bos and smol.tokenize("Hello", add_special=True) == smol.tokenize("Hello")


def test_eog_ids():
    smol = model_tokenizer("smollm2")
    assert {smol.token_id("<|im_end|>"), smol.token_id("<|endoftext|>"), smol.eos_id} <= smol.eog_ids
    gemma = model_tokenizer("gemma3")
    assert {gemma.token_id("<end_of_turn>"), gemma.token_id("<eos>")} <= gemma.eog_ids
    assert gemma.add_bos and gemma.bos_id == gemma.token_id("<bos>")


def test_harmony_eog_drops_end():
    markers = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
               "<|endoftext|>"]
    meta = tiny_vocab_meta("gpt-4o", markers)
    meta["tokenizer.ggml.eos_token_id"] = meta["tokenizer.ggml.tokens"].index("<|endoftext|>")
    tok = Tokenizer.from_vocab(read_vocab(meta))
    ids = {m: tok.token_id(m) for m in markers}
    assert tok.eog_ids == {ids["<|return|>"], ids["<|call|>"], ids["<|endoftext|>"]}
    # like llama.cpp, the harmony markers are user-defined: parsed and rendered even without special
    text = "<|channel|>final<|message|>hi<|end|>"
    got = tok.tokenize(text)
    assert ids["<|channel|>"] in got and ids["<|end|>"] in got
    assert tok.detokenize(got, skip_special=True) == text


def test_lone_surrogates_read_as_replacement_characters():
    tok = vocab_tokenizer("gpt-2")
    assert tok.tokenize("a\ud800b") == tok.tokenize("a\ufffdb")


def test_bad_ids_are_refused():
    tok = vocab_tokenizer("gpt-2")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.detokenize([tok.vocab_size])
    with pytest.raises(TokenizerError):
        tok.token_text(-1)


def test_tokenizer_json_round_trip(tmp_path):
    corpus = json.loads((DATA / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    for name, tok in [("smollm2", model_tokenizer("smollm2")), ("llama-spm", vocab_tokenizer("llama-spm"))]:
        folder = tmp_path / name
        folder.mkdir()
        tok.save(folder / "tokenizer.json")
        loaded = load_tokenizer(folder / "tokenizer.json")
        assert (loaded.bos_id, loaded.eos_id, loaded.add_bos, loaded.vocab_size) == \
               (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size)
        assert loaded.chat_template == tok.chat_template
        assert tok.eos_id in loaded.eog_ids
        for text in corpus:
            for special in (False, True):
                ids = tok.tokenize(text, add_special=True, parse_special=special)
                assert loaded.tokenize(text, add_special=True, parse_special=special) == ids, (name, text)
                assert loaded.detokenize(ids) == tok.detokenize(ids)


def test_tokenizer_json_without_config_takes_bos_eos_from_post_processor(tmp_path):
    from tokenizers import processors

    tok = model_tokenizer("smollm2")
    hf = tok.hf_tokenizer.from_str(tok.hf_tokenizer.to_str())
    bos, eos = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    hf.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", bos), ("<|im_end|>", eos)])
    hf.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert (loaded.bos_id, loaded.eos_id, loaded.add_bos, loaded.add_eos) == (bos, eos, True, True)
    assert loaded.tokenize("Hi there", add_special=True) == [bos, *tok.tokenize("Hi there"), eos]
    assert loaded.chat_template is None and eos in loaded.eog_ids


def test_saved_tokenizer_json_reads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = model_tokenizer("smollm2")
    tok.save(tmp_path / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    corpus = json.loads((DATA / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    for text in corpus:  # transformers always reads special tokens in text
        assert hf.encode(text, add_special_tokens=False) == tok.tokenize(text, parse_special=True), text
    assert hf.eos_token == "<|im_end|>" and hf.chat_template == tok.chat_template


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing.gguf")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(bad)


def stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    dec = tok.stream_decoder(skip_special)
    assert isinstance(dec, StreamDecoder)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decoder_holds_partial_characters():
    tok = model_tokenizer("smollm2")
    ids = tok.tokenize("a😀")  # the emoji is split over byte-level tokens
    pieces = stream(tok, ids)
    assert "".join(pieces) == "a😀" and "\ufffd" not in "".join(pieces)
    assert len([p for p in pieces if p]) == 2
    spm = vocab_tokenizer("llama-spm")  # <0xNN> byte-fallback tokens
    ids = spm.tokenize("🦙x")
    assert "".join(stream(spm, ids)) == spm.detokenize(ids) == "🦙x"


unicode_text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=unicode_text, model=st.sampled_from(["smollm2", "gemma3", "llama-spm"]))
def test_stream_decode_property(text, model):
    tok = vocab_tokenizer(model) if model == "llama-spm" else model_tokenizer(model)
    ids = tok.tokenize(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.detokenize(ids)
    # SmolLM2 has no token for some bytes (0xF1...), which llama.cpp drops too; and SentencePiece
    # reads '▁' as a space. Where the vocabulary can spell the text, no piece breaks a character.
    if tok.detokenize(ids) == text:
        assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text
    elif model == "gemma3":
        assert "\u2581" in text  # Gemma 3 has byte fallback: anything else round-trips


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 50256), max_size=30))
def test_stream_decode_of_arbitrary_ids_matches_detokenize(ids):
    # Random byte-level ids make invalid UTF-8; the stream must replace it exactly as detokenize does.
    tok = vocab_tokenizer("gpt-2")
    assert "".join(stream(tok, ids)) == tok.detokenize(ids)


def test_stream_continuation_keeps_the_first_space():
    # SentencePiece with add_space_prefix: a text's first space was added, a continuation's was generated.
    spm = vocab_tokenizer("llama-spm")
    ids = spm.tokenize("Paris is")
    assert "".join(stream(spm, ids)) == "Paris is"
    dec = spm.stream_decoder(continuation=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == " Paris is"
