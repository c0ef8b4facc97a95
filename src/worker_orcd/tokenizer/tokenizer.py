"""`Tokenizer`: text <-> ids with llama.cpp's semantics, over a `tokenizers.Tokenizer`.

Encoding runs in `tokenizers`. Decoding is ours: every id maps to the bytes it stands for (as
llama.cpp's token_to_piece), so a decode is a byte join and a stream decode is the same join fed
through an incremental UTF-8 decoder.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:
    from worker_orcd.tokenizer.sandbox import RenderLimits

from worker_orcd.tokenizer.errors import TokenizerError
from worker_orcd.tokenizer.pieces import byte_level_pieces, sentencepiece_pieces
from worker_orcd.tokenizer.stream import StreamDecoder
from worker_orcd.tokenizer.vocab import CONTROL, UNKNOWN, Vocab, read_vocab

_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    """A model's tokenizer: `tokenize`, `detokenize`, special ids, stream decoding, chat template."""

    def __init__(self, hf: HFTokenizer, *, pieces: list[bytes], special_ids: frozenset[int],
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool,
                 eog_ids: frozenset[int], strip_space_prefix: bool, chat_template: str | None,
                 rstrip_ids: frozenset[int] = frozenset()) -> None:
        self._hf = hf
        self._pieces = pieces
        self._special_ids = special_ids  # rendered as "" when skip_special
        self._strip_space_prefix = strip_space_prefix
        self._lock = threading.Lock()  # guards the encode_special_tokens switch on the shared object
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.eog_ids = eog_ids
        self.chat_template = chat_template
        self.vocab_size = len(pieces)
        # special tokens that swallow the ASCII whitespace after them (llama.cpp's RSTRIP, Phi-3)
        self._rstrip = {parse: _rstrip_pattern([self.token_text(i) for i in rstrip_ids
                                                if parse or i not in special_ids])
                        for parse in (False, True)}

    @classmethod
    def from_vocab(cls, vocab: Vocab) -> Tokenizer:
        from worker_orcd.tokenizer.build import build_hf_tokenizer

        hf = build_hf_tokenizer(vocab)
        if vocab.model == "gpt2":
            pieces = byte_level_pieces(vocab.tokens, vocab.types)
        else:
            pieces = sentencepiece_pieces(vocab.tokens, vocab.types)
        return cls(
            hf, pieces=pieces,
            special_ids=frozenset(i for i, t in enumerate(vocab.types) if t in (CONTROL, UNKNOWN)),
            bos_id=vocab.bos_id, eos_id=vocab.eos_id, add_bos=vocab.add_bos, add_eos=vocab.add_eos,
            eog_ids=vocab.eog_ids, strip_space_prefix=vocab.model == "llama" and vocab.add_space_prefix,
            chat_template=vocab.chat_template, rstrip_ids=vocab.rstrip_ids,
        )

    @classmethod
    def from_gguf(cls, gguf_file: Any) -> Tokenizer:
        """From an open GGUFFile (vocab-only files too)."""
        try:
            return cls.from_vocab(read_vocab(gguf_file.metadata))
        except TokenizerError as e:
            raise TokenizerError(f"{gguf_file.path}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> Tokenizer:
        from worker_orcd.tokenizer.hf_json import tokenizer_from_json

        return tokenizer_from_json(cls, Path(path))

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Ids for `text`; add_special adds BOS/EOS as the model says, parse_special reads control tokens."""
        # JSON can carry lone surrogates ("\ud800"); they have no UTF-8, so read them as U+FFFD
        text = _SURROGATE.sub("\ufffd", text)
        if (rstrip := self._rstrip[parse_special]) is not None:
            text = rstrip.sub(r"\1", text)
        with self._lock:
            self._hf.encode_special_tokens = not parse_special
            # encode_batch releases the GIL (encode does not): a long prompt no longer stalls the event loop
            # and the scheduler (measured: 0.12 s vs 3.7 s for a 2 MiB prompt)
            ids = self._hf.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def piece(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes one id stands for (control tokens: their text, or b'' when skip_special)."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if skip_special and token_id in self._special_ids:
            return b""
        return self._pieces[token_id]

    def detokenize(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for `ids`; bytes that do not form UTF-8 become U+FFFD."""
        data = b"".join(self.pieces(ids, skip_special))
        return data.decode("utf-8", errors="replace")

    def pieces(self, ids: Iterable[int], skip_special: bool = False) -> list[bytes]:
        """The bytes of each id, the first without SentencePiece's added space prefix."""
        out = [self.piece(int(i), skip_special) for i in ids]
        if out and self._strip_space_prefix and out[0].startswith(b" "):
            out[0] = out[0][1:]  # SentencePiece's added space prefix (llama.cpp strips it on decode)
        return out

    def token_text(self, token_id: int) -> str:
        """The token's string as the vocabulary stores it (e.g. 'Ġthe', '▁the', '<|im_end|>')."""
        text = self._hf.id_to_token(int(token_id)) if 0 <= token_id < self.vocab_size else None
        if text is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return text

    def token_id(self, text: str) -> int | None:
        """The id of a token given its vocabulary string, or None."""
        return self._hf.token_to_id(text)

    def stream_decoder(self, skip_special: bool = False, continuation: bool = False) -> StreamDecoder:
        """A decoder fed one id at a time that yields only complete UTF-8 text, joining to
        `detokenize(ids)`. continuation=True: the ids follow a prompt (generated text), so the first
        piece keeps its leading space, as llama.cpp's server renders each generated piece."""
        return StreamDecoder(self, skip_special, continuation)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            *, limits: RenderLimits | None = None, **kwargs: Any) -> str:
        """Render the model's chat template (HF semantics: sandboxed jinja2, trim/lstrip blocks), within
        `limits` (time and size; default chat.DEFAULT_LIMITS)."""
        from worker_orcd.tokenizer.chat import DEFAULT_LIMITS, render_chat_template

        if self.chat_template is None:
            raise TokenizerError("this model has no chat template (tokenizer.chat_template)")
        specials = {"bos_token": self._special_text(self.bos_id),
                    "eos_token": self._special_text(self.eos_id)}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    limits=limits or DEFAULT_LIMITS, **{**specials, **kwargs})

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.token_text(token_id)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json (and tokenizer_config.json beside it with bos/eos and the chat template)."""
        path = Path(path)
        self._hf.save(str(path))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # so transformers' AutoTokenizer reads it too
            "bos_token": None if self.bos_id is None else self.token_text(self.bos_id),
            "eos_token": None if self.eos_id is None else self.token_text(self.eos_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "chat_template": self.chat_template,
        }
        (path.parent / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for building a transformers tokenizer around it)."""
        return self._hf


def _rstrip_pattern(texts: list[str]) -> re.Pattern | None:
    if not texts:
        return None
    alternatives = "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))
    return re.compile(f"({alternatives})[ \t\n\v\f\r]+")  # C isspace, as llama.cpp tests


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a GGUF file (vocab-only too) or a tokenizer.json (config read from beside it)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from worker_orcd.gguf import open_gguf

        with open_gguf(path) as f:
            return Tokenizer.from_gguf(f)
    return Tokenizer.from_json(path)

