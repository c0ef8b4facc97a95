"""A structure-aware mutator for the tokenizer harness: change one tokenizer metadata value and write
the file again, so most inputs reach the tokenizer instead of dying in the GGUF header.

Byte-level mutations (libFuzzer's own) still run for a quarter of the inputs and for any input that
does not parse. The written file is vocabulary only (tensors dropped): the tokenizer never reads them.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGUFValueType

from worker_orcd.gguf import GGUFError, open_gguf
from worker_orcd.tokenizer.pretokenize import PRE_TYPES

T = "tokenizer.ggml."
ID_KEYS = [f"{T}{k}_token_id" for k in ("bos", "eos", "unknown", "eot", "eom", "padding", "fim_pad", "fim_rep",
                                        "fim_sep")]
FLAG_KEYS = [f"{T}add_bos_token", f"{T}add_eos_token", f"{T}add_space_prefix"]
TOKEN_TEXTS = ["", " ", "\u2581", "\u2581\u2581", "<0x0A>", "<0xZZ>", "<|im_start|>", "<|im_end|>", "<|end|>",
               "<|return|>", "<|call|>", "<|channel|>", "<|message|>", "<|endoftext|>", "</s>", "<s>", "<unk>",
               "[EMPTY_0]", "\x00", "\ufffd", "e\u0301", "\U0001f600", "Ġ", "Ċ", "ĠĠ", "a b", "'s", "\t\n\r"]
TEMPLATE_SNIPPETS = [
    "{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.role }}{% endfor %}", "{{ bos_token }}",
    "{{ raise_exception('no') }}", "{{ ''.__class__ }}", "{{ cycler.__init__.__globals__ }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 100000000 }}", "{{ 9 ** (9 ** 9) }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ messages|tojson(indent=1000000) }}", "{{ 'a'|center(100000000) }}", "{{ '%99999999d' % 1 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{{ strftime_now('%Y') }}", "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{{ tools|tojson }}", "{{ messages|map(attribute='content')|join('\\n') }}", "{% break %}", "{{",
    "{% endfor %}", "{{ 1 + 'a' }}", "{{ messages[1000] }}", "{{ (range(10)|list)[::-1] }}",
    "{% set b = 'x' * 4000000 %}{{ [b] * 4000000 }}", "{{ (10 ** 4000)|round(-1000000000) }}",
    "{{ ([[1]] * 100000)|sum(start=[]) }}", "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}",
    "{{ messages|map(attribute='content')|map('upper')|list }}", "{{ '%s' % (messages,) }}",
]


def parse(data: bytes, scratch: Any) -> tuple[dict[str, Any], dict[str, GGUFValueType]] | None:
    try:
        with open_gguf(scratch.write(data)) as f:
            return dict(f.metadata), dict(f.metadata_types)
    except GGUFError:
        return None


# -- writing a vocabulary-only GGUF ----------------------------------------------------------

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_DTYPES = {np.dtype(np.uint8): GGUFValueType.UINT8, np.dtype(np.int8): GGUFValueType.INT8,
           np.dtype(np.uint16): GGUFValueType.UINT16, np.dtype(np.int16): GGUFValueType.INT16,
           np.dtype(np.uint32): GGUFValueType.UINT32, np.dtype(np.int32): GGUFValueType.INT32,
           np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(np.bool_): GGUFValueType.BOOL,
           np.dtype(np.uint64): GGUFValueType.UINT64, np.dtype(np.int64): GGUFValueType.INT64,
           np.dtype(np.float64): GGUFValueType.FLOAT64}


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _scalar_type(value: Any) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if 0 <= value < 2**32:
        return GGUFValueType.UINT32
    return GGUFValueType.UINT64 if value >= 0 else GGUFValueType.INT64


def _value(value: Any, vtype: GGUFValueType | None) -> bytes:
    """Type id and payload; vtype None: inferred from the Python value."""
    if isinstance(value, np.ndarray):
        etype = _DTYPES[value.dtype]
        body = struct.pack("<IQ", etype, len(value)) + value.astype(value.dtype.newbyteorder("<")).tobytes()
        return struct.pack("<I", GGUFValueType.ARRAY) + body
    if isinstance(value, list):
        return struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, len(value)) + b"".join(
            _string(str(v)) for v in value)
    if vtype is None or vtype == GGUFValueType.ARRAY:
        vtype = _scalar_type(value)
    if vtype == GGUFValueType.STRING:
        return struct.pack("<I", vtype) + _string(str(value))
    return struct.pack("<I", vtype) + struct.pack(_SCALAR_FORMATS[vtype], value)


def write_vocab_gguf(meta: dict[str, Any], types: dict[str, GGUFValueType | None]) -> bytes:
    """A GGUF v3 file holding `meta` and no tensors."""
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(meta))]
    for key, value in meta.items():
        out.append(_string(key) + _value(value, types.get(key)))
    return b"".join(out)


# -- mutations of tokenizer metadata ---------------------------------------------------------

def _tokens(meta: dict[str, Any]) -> list[str]:
    tokens = meta.get(f"{T}tokens")
    return tokens if isinstance(tokens, list) and tokens else ["a"]


def _odd_text(rng: random.Random, meta: dict[str, Any]) -> str:
    tokens = _tokens(meta)
    choice = rng.randrange(4)
    if choice == 0:
        return rng.choice(TOKEN_TEXTS)
    if choice == 1:
        return rng.choice(tokens)  # a duplicate
    if choice == 2:
        return rng.choice(tokens) * rng.choice([2, 3, 50, 2000])
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x800), rng.randrange(0x4E00, 0x4F00),
                                   rng.randrange(0x1F300, 0x1F600)])) for _ in range(rng.randrange(1, 6)))


def set_token(meta: dict[str, Any], rng: random.Random) -> None:
    tokens = list(_tokens(meta))
    tokens[rng.randrange(len(tokens))] = _odd_text(rng, meta)
    meta[f"{T}tokens"] = tokens


def append_tokens(meta: dict[str, Any], rng: random.Random) -> None:
    tokens = list(_tokens(meta)) + [_odd_text(rng, meta) for _ in range(rng.randrange(1, 4))]
    meta[f"{T}tokens"] = tokens


def _numbers(meta: dict[str, Any], key: str, dtype: type) -> np.ndarray:
    """A copy of a numeric array value, or a fresh one per token when the value is not one."""
    value = meta.get(key)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return value.astype(dtype)
    return np.ones(len(_tokens(meta)), dtype)


def set_token_type(meta: dict[str, Any], rng: random.Random) -> None:
    types = _numbers(meta, f"{T}token_type", np.int32)
    if len(types):
        types[rng.randrange(len(types))] = rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 7, 99])
    meta[f"{T}token_type"] = types


def set_score(meta: dict[str, Any], rng: random.Random) -> None:
    scores = _numbers(meta, f"{T}scores", np.float32)
    if len(scores):
        scores[rng.randrange(len(scores))] = rng.choice([np.nan, np.inf, -np.inf, 3e38, -1e30, 0.0])
    meta[f"{T}scores"] = scores


def change_merges(meta: dict[str, Any], rng: random.Random) -> None:
    merges = meta.get(f"{T}merges")
    merges = list(merges) if isinstance(merges, list) else []
    tokens = _tokens(meta)
    choice = rng.randrange(4)
    if choice == 0 or not merges:
        merges.insert(rng.randrange(len(merges) + 1), f"{rng.choice(tokens)} {rng.choice(tokens)}")
    elif choice == 1:
        merges[rng.randrange(len(merges))] = rng.choice(["nospace", " lead", "a  b", "", f"{_odd_text(rng, meta)} x"])
    elif choice == 2:
        merges.append(rng.choice(merges))
    else:
        del merges[rng.randrange(len(merges))]
    meta[f"{T}merges"] = merges


def set_id(meta: dict[str, Any], rng: random.Random) -> None:
    n = len(_tokens(meta))
    meta[rng.choice(ID_KEYS)] = rng.choice([0, 1, n - 1, n, 2**32 - 1, rng.randrange(max(n, 1)), -1, 1.5, "1", True])


def set_flag(meta: dict[str, Any], rng: random.Random) -> None:
    meta[rng.choice(FLAG_KEYS)] = rng.choice([True, False, 1, "yes"])


def set_model(meta: dict[str, Any], rng: random.Random) -> None:
    key = rng.choice([f"{T}model", f"{T}pre"])
    meta[key] = rng.choice(["gpt2", "llama", "bert", "", "GPT2", 7, *PRE_TYPES])


def set_name(meta: dict[str, Any], rng: random.Random) -> None:
    meta["general.name"] = rng.choice(["Phi-3 mini", "phi3", "x", 3])


def change_template(meta: dict[str, Any], rng: random.Random) -> None:
    template = meta.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else ""
    snippet = rng.choice(TEMPLATE_SNIPPETS)
    choice = rng.randrange(3)
    if choice == 0:
        template = snippet
    elif choice == 1:
        at = rng.randrange(len(template) + 1)
        template = template[:at] + snippet + template[at:]
    elif template:
        at = rng.randrange(len(template))
        template = template[:at] + template[at + rng.randrange(1, 8):]
    meta["tokenizer.chat_template"] = template


def change_type(meta: dict[str, Any], rng: random.Random) -> None:
    """A key's value replaced by a value of another kind."""
    key = rng.choice([f"{T}tokens", f"{T}token_type", f"{T}scores", f"{T}merges", f"{T}model", *ID_KEYS,
                      "tokenizer.chat_template", *FLAG_KEYS])
    meta[key] = rng.choice([7, "text", 1.5, True, ["a", "b"], np.arange(3, dtype=np.int32),
                            np.zeros(0, dtype=np.float32), []])


def shorten_array(meta: dict[str, Any], rng: random.Random) -> None:
    key = rng.choice([f"{T}token_type", f"{T}scores", f"{T}tokens"])
    value = meta.get(key)
    if isinstance(value, (list, np.ndarray)) and len(value):
        meta[key] = value[: rng.randrange(len(value))]


def drop_key(meta: dict[str, Any], rng: random.Random) -> None:
    keys = [k for k in meta if k.startswith("tokenizer.")]
    if keys:
        del meta[rng.choice(keys)]


MUTATIONS: list[Callable[[dict[str, Any], random.Random], None]] = [
    set_token, append_tokens, set_token_type, set_score, change_merges, set_id, set_flag, set_model, set_name,
    change_template, change_type, shorten_array, drop_key,
]


def mutate_metadata(meta: dict[str, Any], types: dict[str, GGUFValueType | None], rng: random.Random) -> None:
    """One to three mutations; keys they touch lose their recorded type (inferred when written)."""
    before = {k: id(v) for k, v in meta.items()}
    for _ in range(rng.choice([1, 1, 2, 3])):
        rng.choice(MUTATIONS)(meta, rng)
    for key, value in meta.items():
        if before.get(key) != id(value):
            types[key] = None
