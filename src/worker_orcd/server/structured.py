"""Structured output: `response_format` json_object / json_schema (and vLLM's `structured_outputs`: regex,
choice, EBNF grammar), and forced tool calls, through a grammar engine's token masks.

The engine (xgrammar; llguidance as the alternative: `bench/grammar_mask.py` measures both)
is built once per tokenizer from our token pieces (the bytes each id stands for, as `detokenize` joins
them), so the grammar sees exactly the text the API returns. A request gets a `GrammarConstraint`: the
scheduler calls it with the logits and the sequence so far before sampling (`Request.logits_processor`);
it feeds the tokens sampled since the last call to the matcher and masks every token the grammar forbids.
After a complete match only end-of-generation tokens stay allowed.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

ENGINES = ("xgrammar", "llguidance")  # the first is the server's (faster masks: bench/grammar_mask.py)
_cache: dict[tuple[int, str], Any] = {}
_lock = threading.Lock()


class GrammarError(ValueError):
    """The schema cannot be compiled (unsupported keyword, invalid schema)."""


def _pieces(tok) -> list[bytes]:
    return [tok.piece(i) for i in range(tok.vocab_size)]


def _special(tok) -> set[int]:
    return {i for i in range(tok.vocab_size) if tok.piece(i, skip_special=True) == b"" and tok.piece(i) != b""}


class _LLGTokenizer:
    """What llguidance's LLTokenizer reads from a tokenizer: pieces (special ones marked with 0xff), EOS."""

    def __init__(self, tok):
        special = _special(tok)
        self.tokens = [b"\xff" + p if i in special else p for i, p in enumerate(_pieces(tok))]
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids)
        self.bos_token_id = tok.bos_id
        self.special_token_ids = sorted(special)
        self.is_tokenizer_wrapper = True  # what LLTokenizer checks for
        self._tok = tok

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tok.tokenize(text)


def engine_tokenizer(tok, engine: str = ENGINES[0]) -> Any:
    """The engine's view of `tok`, built once (~1 s for a 262k vocabulary) and cached."""
    key = (id(tok), engine)
    with _lock:
        if key not in _cache:
            if engine == "llguidance":
                import llguidance

                _cache[key] = llguidance.LLTokenizer(_LLGTokenizer(tok), eos_token=sorted(tok.eog_ids))
            else:
                import xgrammar as xgr

                special = _special(tok)
                vocab = [b"" if i in special else p for i, p in enumerate(_pieces(tok))]
                info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                         stop_token_ids=sorted(tok.eog_ids))
                _cache[key] = xgr.GrammarCompiler(info, max_threads=1)
        return _cache[key]


def schema_of(response_format) -> dict | None:
    """The JSON schema a ResponseFormat asks for ({"type": "object"} for json_object), or None for text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    return response_format.json_schema.schema_


def output_grammar(response_format, structured_outputs) -> Any | None:
    """The xgrammar Grammar a request's output must follow (response_format, or vLLM's structured_outputs:
    json / regex / choice / grammar in EBNF), or None. Raises GrammarError naming what cannot be used."""
    schema = schema_of(response_format)
    so = structured_outputs
    if schema is None and so is None:
        return None
    import xgrammar as xgr

    try:
        if schema is not None or so.json_ is not None:
            return xgr.Grammar.from_json_schema(json.dumps(schema if schema is not None else so.json_),
                                                any_whitespace=False)
        if so.regex is not None:
            return xgr.Grammar.from_regex(so.regex)
        if so.choice is not None:
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in so.choice))
        return xgr.Grammar.from_ebnf(so.grammar)
    except Exception as e:  # xgrammar raises RuntimeError (or ValueError) on what it cannot parse
        raise GrammarError(str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__) from None


# what follows a forced call's opening (tool_calls.call_prefix): the name's tail, then after the arguments
_NAME_TAIL = {"harmony": " <|constrain|>json<|message|>", "hermes": "\", \"arguments\": ",
              "llama3": "\", \"parameters\": ", "generic": "\", \"arguments\": "}
_CALL_END = {"harmony": "", "hermes": "}\n</tool_call>", "llama3": "}", "generic": "}}"}


def tool_call_grammar(fmt: str, tools: list[dict], name: str | None) -> Any:
    """An xgrammar Grammar for the rest of a forced call, after `call_prefix(fmt, name)`: for tool_choice
    required one offered name (and the text up to its arguments), then arguments valid against that
    function's parameters, then the format's closing text (then end of generation)."""
    import xgrammar as xgr

    def literal(text: str) -> list:
        return [xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")] if text else []

    def call(tool: dict, with_name: bool) -> Any:
        fn = tool["function"]
        schema = fn.get("parameters") or {"type": "object"}
        try:
            args = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as e:
            raise GrammarError(f"the parameters of {fn['name']!r}: {e}") from None
        parts = (literal(fn["name"] + _NAME_TAIL[fmt]) if with_name else []) + [args] + literal(_CALL_END[fmt])
        return xgr.Grammar.concat(*parts) if len(parts) > 1 else parts[0]

    if name is not None:
        return call(next(t for t in tools if t["function"]["name"] == name), with_name=False)
    calls = [call(t, with_name=True) for t in tools]
    return xgr.Grammar.union(*calls) if len(calls) > 1 else calls[0]


class GrammarConstraint:
    """One request's grammar state: call it with (logits [vocab], sequence so far) before sampling.
    `grammar`: an xgrammar Grammar (`output_grammar`, `tool_call_grammar`); or `schema`, a JSON schema (the
    only form the llguidance engine takes here, for bench/grammar_mask.py)."""

    def __init__(self, tok, n_prompt: int, *, schema: dict | None = None, grammar: Any = None,
                 engine: str = ENGINES[0]):
        self.engine, self.n_prompt, self.consumed = engine, n_prompt, 0
        self.vocab = tok.vocab_size
        compiled = engine_tokenizer(tok, engine)
        if engine == "llguidance":
            import llguidance
            import llguidance.torch as llt

            text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                 defaults={"whitespace_flexible": False})
            self.matcher = llguidance.LLMatcher(compiled, text, log_level=0)
            if self.matcher.is_error():
                raise GrammarError(self.matcher.get_error())
            self._fill = lambda mask: llt.fill_next_token_bitmask(self.matcher, mask)
            self.mask = llt.allocate_token_bitmask(1, self.vocab)
        else:
            import xgrammar as xgr

            try:
                ready = compiled.compile_grammar(grammar) if grammar is not None else \
                    compiled.compile_json_schema(json.dumps(schema), any_whitespace=False)
            except Exception as e:  # xgrammar raises RuntimeError on schemas it cannot take
                raise GrammarError(str(e)) from None
            self.matcher = xgr.GrammarMatcher(ready)
            self._fill = lambda mask: self.matcher.fill_next_token_bitmask(mask)
            self.mask = xgr.allocate_token_bitmask(1, self.vocab)
        self._bits = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        for token in history[self.n_prompt + self.consumed:]:
            self._consume(token)
            self.consumed += 1
        self.fill()
        allowed = self.allowed()
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def _consume(self, token: int) -> None:
        ok = self.matcher.consume_token(token) if self.engine == "llguidance" else self.matcher.accept_token(token)
        if not ok:
            raise GrammarError(f"token {token} does not fit the grammar")

    def fill(self) -> None:
        """The next token's mask (the engine's cost per token; what bench/grammar_mask.py times)."""
        self._fill(self.mask)

    def allowed(self) -> torch.Tensor:
        """bool [vocab] from the bitmask (bit i of word w: token 32 w + i)."""
        bits = (self.mask[0].unsqueeze(1) & self._bits) != 0
        return bits.reshape(-1)[: self.vocab]

    def accept(self, token: int) -> None:
        """Advance by one token (the benchmark's walk; the server advances through __call__)."""
        self._consume(token)
        self.consumed += 1
