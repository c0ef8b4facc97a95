"""Incremental detokenization that never splits a UTF-8 character."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker_orcd.tokenizer.tokenizer import Tokenizer


class StreamDecoder:
    """Fed ids one at a time; `push` returns only whole characters, so the pieces joined equal
    `detokenize(all ids)` (a byte-level or `<0xNN>` token may carry part of a character)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, continuation: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = not continuation  # only the start of a text had a space prefix added

    def push(self, token_id: int) -> str:
        """Text completed by this id ('' while a character is still partial)."""
        if self._first:
            self._first = False
            data = self._tokenizer.pieces([token_id], self._skip_special)[0]
        else:
            data = self._tokenizer.piece(int(token_id), self._skip_special)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is left at the end; an unfinished character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
