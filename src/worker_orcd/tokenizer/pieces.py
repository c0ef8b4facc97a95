"""The bytes each token id stands for, as llama.cpp's token_to_piece renders them."""

from __future__ import annotations

import re
from functools import cache

from worker_orcd.tokenizer.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable stand-in character -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _byte_token(text: str) -> bytes:
    m = _BYTE_TOKEN.fullmatch(text)
    return bytes([int(m.group(1), 16)]) if m else text.encode("utf-8", "replace")


def _literal(text: str) -> bytes:
    return text.encode("utf-8", "replace")


def byte_level_pieces(tokens: list[str], types: list[int]) -> list[bytes]:
    """Byte-level BPE: a normal token's characters each stand for one byte."""
    decoder = gpt2_byte_decoder()

    def normal(text: str) -> bytes:
        return b"".join(bytes([decoder[c]]) if c in decoder else _literal(c) for c in text)

    return [_piece(t, kind, normal) for t, kind in zip(tokens, types)]


def sentencepiece_pieces(tokens: list[str], types: list[int]) -> list[bytes]:
    """SentencePiece: '▁' is a space; `<0xNN>` byte tokens are one byte."""
    def normal(text: str) -> bytes:
        return _literal(text.replace("\u2581", " "))

    return [_piece(t, kind, normal) for t, kind in zip(tokens, types)]


def _piece(text: str, kind: int, normal) -> bytes:
    if kind in (CONTROL, UNKNOWN, USER_DEFINED):
        return _literal(text)
    if kind == NORMAL:
        return normal(text)
    if kind == BYTE:
        return _byte_token(text)
    return b""  # unused/undefined tokens render as nothing in llama.cpp
