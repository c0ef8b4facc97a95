"""A Tokenizer from a Hugging Face tokenizer.json, with tokenizer_config.json beside it when present."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from worker_orcd.tokenizer.errors import TokenizerError
from worker_orcd.tokenizer.pieces import byte_level_pieces, sentencepiece_pieces
from worker_orcd.tokenizer.vocab import BYTE, CONTROL, EOG_TEXTS, NORMAL, USER_DEFINED

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_from_json(cls: type, path: Path) -> Any:
    """A `cls` (Tokenizer) from tokenizer.json: added tokens marked special act as control tokens,
    the others as user-defined; BOS/EOS from tokenizer_config.json or from the post-processor."""
    try:
        hf = HFTokenizer.from_file(str(path))
        spec = json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
    config = _read_config(path.parent / "tokenizer_config.json")
    n = hf.get_vocab_size(with_added_tokens=True)
    tokens = [hf.id_to_token(i) or "" for i in range(n)]
    types = _token_types(hf, spec, tokens)
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
    pieces = byte_level_pieces(tokens, types) if byte_level else sentencepiece_pieces(tokens, types)

    head, tail = _post_processor_adds(hf)
    bos_id, add_bos = _edge_token(hf, config, "bos", head)
    eos_id, add_eos = _edge_token(hf, config, "eos", tail)
    eog = {i for i, t in enumerate(tokens) if t in EOG_TEXTS} | ({eos_id} if eos_id is not None else set())
    return cls(
        hf, pieces=pieces, special_ids=frozenset(i for i, t in enumerate(types) if t == CONTROL),
        bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, add_eos=add_eos, eog_ids=frozenset(eog),
        strip_space_prefix=not byte_level and _strips_space_prefix(spec.get("decoder")),
        chat_template=_chat_template(config),
    )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _token_types(hf: HFTokenizer, spec: dict[str, Any], tokens: list[str]) -> list[int]:
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    types = [BYTE if byte_fallback and _BYTE_TOKEN.fullmatch(t) else NORMAL for t in tokens]
    for i, added in hf.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    return types


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a token either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _post_processor_adds(hf: HFTokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text."""
    plain = hf.encode("a", add_special_tokens=False).ids
    full = hf.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def _edge_token(hf: HFTokenizer, config: dict[str, Any], name: str,
                extra: list[int]) -> tuple[int | None, bool]:
    """(id, added-by-default) for BOS or EOS: from the config, else from what the post-processor adds."""
    text = _token_text(config.get(f"{name}_token"))
    token_id = hf.token_to_id(text) if text else (extra[0] if len(extra) == 1 else None)
    added = config.get(f"add_{name}_token")
    if added is None:
        added = token_id is not None and extra == [token_id]
    return token_id, bool(added) and token_id is not None


def _strips_space_prefix(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_strips_space_prefix(d) for d in decoder.get("decoders", []))
    if decoder.get("type") == "Strip":
        return decoder.get("content") == " " and decoder.get("start", 0) >= 1
    if decoder.get("type") == "Metaspace":
        return decoder.get("prepend_scheme", "always") != "never" and decoder.get("add_prefix_space", True)
    return False


def _chat_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None
