"""The vocabulary a GGUF file declares (`tokenizer.ggml.*`), read as llama.cpp's llama_vocab::load reads it.

Token types follow llama.cpp: control and unknown tokens are parsed from text only on request and
rendered only on request; user-defined tokens are always parsed and rendered; byte tokens `<0xNN>`
stand for one byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from worker_orcd.tokenizer.errors import TokenizerError
from worker_orcd.tokenizer.pretokenize import pre_type

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's special_eog_ids: tokens that end generation, found by their text.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
             "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
FIM_EOG_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
                 "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>")
# GPT-OSS: llama.cpp renders these harmony markers always (user-defined), so channels stay visible.
HARMONY_MARKERS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


@dataclass
class Vocab:
    model: str                          # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None                     # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[tuple[str, str]]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int]
    rstrip_ids: frozenset[int]          # special tokens that eat the whitespace after them (Phi-3)
    chat_template: str | None


def _merges(raw: list[str]) -> list[tuple[str, str]]:
    # llama.cpp splits at the first space after position 0, so a merge may start with a space.
    out = []
    for i, m in enumerate(raw):
        pos = m.find(" ", 1)
        if pos < 0:
            raise TokenizerError(f"tokenizer.ggml.merges[{i}] {m!r} has no space between its two parts")
        out.append((m[:pos], m[pos + 1:]))
    return out


def _kind(value: Any) -> str:
    return f"an array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__


def _meta_str(meta: dict[str, Any], key: str) -> str | None:
    """A string value or None; another type is an error, as in llama.cpp's typed get_key."""
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{key} must be a string, got {_kind(value)}")
    return value


def _meta_strings(meta: dict[str, Any], key: str) -> list[str] | None:
    value = meta.get(key)
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise TokenizerError(f"{key} must be an array of strings, got {_kind(value)}")
    return value


def _meta_numbers(meta: dict[str, Any], key: str, integers: bool) -> list | None:
    """A numeric array (numpy from a GGUF file, or a list) as a Python list, or None."""
    value = meta.get(key)
    if value is None:
        return None
    want = (Integral,) if integers else (Integral, Real)
    if isinstance(value, np.ndarray):
        ok = value.ndim == 1 and (np.issubdtype(value.dtype, np.integer) or
                                  (not integers and np.issubdtype(value.dtype, np.floating)))
        value = value.tolist() if ok else value
    else:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, want) and not isinstance(v, bool) for v in value)
    if not ok:
        raise TokenizerError(f"{key} must be an array of {'integers' if integers else 'numbers'}, got {_kind(value)}")
    return list(value)


def _meta_flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, (bool, np.bool_)):
        raise TokenizerError(f"{key} must be a bool, got {_kind(value)}")
    return bool(value)


def _token_id(meta: dict[str, Any], key: str, default: int | None, n: int) -> int | None:
    """An id key; out of range falls back to the default, as llama.cpp does ("bad special token")."""
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is not None and (not isinstance(value, Integral) or isinstance(value, bool)):
        raise TokenizerError(f"tokenizer.ggml.{key} must be an integer, got {_kind(value)}")
    if value is not None and 0 <= int(value) < n:
        return int(value)
    return default if default is not None and 0 <= default < n else None


def _first_with_text(text_to_id: dict[str, int], texts: tuple[str, ...]) -> int | None:
    return next((text_to_id[t] for t in texts if t in text_to_id), None)


def read_vocab(meta: dict[str, Any]) -> Vocab:
    """Read `tokenizer.ggml.*` metadata into a Vocab; raise TokenizerError naming what is missing or wrong."""
    model = _meta_str(meta, "tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(f"tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2', 'llama')")
    tokens = _meta_strings(meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names empty tokens
    types = _per_token(meta, "tokenizer.ggml.token_type", n, NORMAL, integers=True)
    scores = [float(s) for s in _per_token(meta, "tokenizer.ggml.scores", n, 0.0, integers=False)]

    pre = _meta_str(meta, "tokenizer.ggml.pre")
    if model == "gpt2":
        merges_raw = _meta_strings(meta, "tokenizer.ggml.merges")
        if merges_raw is None:
            raise TokenizerError("tokenizer.ggml.merges is missing (needed by tokenizer.ggml.model 'gpt2')")
        merges = _merges(merges_raw)
        _, _, add_bos = pre_type(pre)
        bos, eos, unk, add_space_prefix = 11, 11, None, False
    else:
        merges, add_bos, bos, eos, unk, add_space_prefix = [], True, 1, 2, 0, True
    add_space_prefix = _meta_flag(meta, "tokenizer.ggml.add_space_prefix", add_space_prefix)
    add_bos = _meta_flag(meta, "tokenizer.ggml.add_bos_token", add_bos)
    add_eos = _meta_flag(meta, "tokenizer.ggml.add_eos_token", False)
    bos = _token_id(meta, "bos_token_id", bos, n)
    eos = _token_id(meta, "eos_token_id", eos, n)
    unk = _token_id(meta, "unknown_token_id", unk, n)
    if add_bos and bos is None:
        raise TokenizerError("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is unset")
    if add_eos and eos is None:
        raise TokenizerError("tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is unset")

    eog = _eog_ids(meta, tokens, types, eos)
    return Vocab(
        model=model, pre=pre, tokens=tokens, types=types, scores=scores, merges=merges,
        bos_id=bos, eos_id=eos, unk_id=unk, add_bos=add_bos, add_eos=add_eos,
        add_space_prefix=add_space_prefix, eog_ids=eog,
        rstrip_ids=_phi3_rstrip(meta, tokens, types),
        chat_template=_meta_str(meta, "tokenizer.chat_template"),
    )


def _per_token(meta: dict[str, Any], key: str, n: int, default: float, integers: bool) -> list:
    """One number per token (longer arrays are cut, as llama.cpp reads only the first n)."""
    values = _meta_numbers(meta, key, integers)
    if values is None:
        return [default] * n
    if len(values) < n:
        raise TokenizerError(f"{key} has {len(values)} entries for {n} tokens")
    return values[:n]


def _eog_ids(meta: dict[str, Any], tokens: list[str], types: list[int], eos: int | None) -> frozenset[int]:
    """llama.cpp's special_eog_ids; also retypes tokens the way llama.cpp does (types is changed in place)."""
    n = len(tokens)
    text_to_id = {t: i for i, t in enumerate(tokens)}
    eot = _token_id(meta, "eot_token_id", None, n)
    if eot is None:
        eot = _first_with_text(text_to_id, EOT_TEXTS)
    eom = _token_id(meta, "eom_token_id", None, n)
    if eom is None:
        eom = text_to_id.get("<|eom_id|>")
    eog = {text_to_id[t] for t in FIM_EOG_TEXTS if t in text_to_id}
    for key in ("fim_pad_token_id", "fim_rep_token_id", "fim_sep_token_id"):
        if (i := _token_id(meta, key, None, n)) is not None:
            eog.add(i)
    eog |= {text_to_id[t] for t in EOG_TEXTS if t in text_to_id}
    eog |= {i for i in (eos, eot, eom) if i is not None}
    for i in eog | {i for i in (eot, eom) if i is not None}:
        if types[i] != CONTROL:
            types[i] = CONTROL  # llama.cpp: a "control-looking" token is made control
    for t in HARMONY_MARKERS:
        if t in text_to_id:
            types[text_to_id[t]] = USER_DEFINED
    # Harmony: <|end|> closes a message but not the turn when <|return|> and <|call|> exist.
    texts = {tokens[i] for i in eog}
    harmony = {"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts
    if "<|end|>" in texts and harmony:
        end = text_to_id["<|end|>"]
        eog.discard(end)
        types[end] = USER_DEFINED
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(text_to_id["</s>"])
        types[text_to_id["</s>"]] = NORMAL
    return frozenset(eog)


def _phi3_rstrip(meta: dict[str, Any], tokens: list[str], types: list[int]) -> frozenset[int]:
    # llama.cpp keys this on the model name: Phi-3's special tokens swallow the whitespace after them.
    name = str(meta.get("general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return frozenset()
    ids = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
    text_to_id = {t: i for i, t in enumerate(tokens)}
    ids |= {text_to_id[t] for t in ("</s>",) if t in text_to_id}
    ids -= {text_to_id[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in text_to_id}
    return frozenset(ids)
