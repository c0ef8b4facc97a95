"""A `tokenizers.Tokenizer` from a GGUF Vocab: byte-level BPE for 'gpt2', score-ordered BPE for 'llama'."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from worker_orcd.tokenizer.errors import TokenizerError
from worker_orcd.tokenizer.pieces import gpt2_byte_decoder
from worker_orcd.tokenizer.pretokenize import pre_type
from worker_orcd.tokenizer.vocab import CONTROL, UNKNOWN, USER_DEFINED, Vocab

SPACE = "\u2581"  # SentencePiece's visible space


def build_hf_tokenizer(vocab: Vocab) -> HFTokenizer:
    """The `tokenizers` pipeline that reproduces llama.cpp's tokenizer for this vocabulary."""
    token_to_id = _token_to_id(vocab.tokens)
    try:
        if vocab.model == "gpt2":
            hf = _byte_level_bpe(vocab, token_to_id)
        else:
            hf = _sentencepiece_bpe(vocab, token_to_id)
        _add_special_tokens(hf, vocab)
    except Exception as e:  # tokenizers raises a bare Exception for what it cannot build
        raise TokenizerError(f"cannot build the tokenizer: {e}") from None
    return hf


def _token_to_id(tokens: list[str]) -> dict[str, int]:
    # llama.cpp asserts on duplicates (GGML_ASSERT(id_to_token.size() == token_to_id.size())): refuse them too
    token_to_id: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in token_to_id:
            raise TokenizerError(f"duplicate token in vocabulary: {t!r} has ids {token_to_id[t]} and {i}")
        token_to_id[t] = i
    return token_to_id


def usable_merges(merges: list[tuple[str, str]], token_to_id: dict[str, int]) -> list[tuple[str, str]]:
    """The merges whose parts and result are all tokens. llama.cpp loads the others too, but they either
    never apply or make a symbol with no token, whose text it then drops; `tokenizers` refuses them."""
    return [(a, b) for a, b in merges if a in token_to_id and b in token_to_id and a + b in token_to_id]


def _byte_level_bpe(vocab: Vocab, token_to_id: dict[str, int]) -> HFTokenizer:
    regexes, ignore_merges, _ = pre_type(vocab.pre)
    merges = usable_merges(vocab.merges, token_to_id)
    hf = HFTokenizer(models.BPE(token_to_id, merges, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    # A byte with no token (SmolLM2 lacks 21) is dropped by llama.cpp, but only after merging, so
    # it still separates its neighbours; removing it as a split point does the same.
    missing = "".join(c for c in gpt2_byte_decoder() if c not in token_to_id)
    if missing:
        steps.append(pre_tokenizers.Split(Regex(f"[{re.escape(missing)}]"), behavior="removed"))
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    hf.decoder = decoders.ByteLevel()
    return hf


def spm_merges(tokens: list[str], scores: list[float], token_to_id: dict[str, int]) -> list[tuple[str, str]]:
    """Merges equivalent to llama.cpp's SPM bigram loop: every split of a token into two tokens,
    ranked by the joined token's score (highest first), so BPE merges what llama.cpp merges."""
    lengths = sorted({len(t) for t in tokens})
    found = []
    for i, t in enumerate(tokens):
        for k in _split_points(len(t), lengths):
            left, right = t[:k], t[k:]
            if left in token_to_id and right in token_to_id:
                found.append((-scores[i], i, k))
    found.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in found]


def _split_points(n: int, lengths: list[int]) -> Iterable[int]:
    """Where a token of length n may split into two tokens. Only at token lengths, so a very long
    token costs the number of distinct lengths, not its own length (each try hashes O(n) characters)."""
    if n - 1 <= len(lengths):
        return range(1, n)
    present = set(lengths)
    return (k for k in lengths if k < n and n - k in present)


def _sentencepiece_bpe(vocab: Vocab, token_to_id: dict[str, int]) -> HFTokenizer:
    merges = spm_merges(vocab.tokens, vocab.scores, token_to_id)
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    hf = HFTokenizer(models.BPE(token_to_id, merges, unk_token=unk, byte_fallback=True))
    # llama.cpp prepends a space to every text fragment (each one starts the text or follows a
    # special token), then escapes spaces; a normalizer runs per fragment the same way.
    steps = [normalizers.Prepend(SPACE)] if vocab.add_space_prefix else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    return hf


def _add_special_tokens(hf: HFTokenizer, vocab: Vocab) -> None:
    # Control/unknown tokens are `special` (parsed only when asked); user-defined ones are plain
    # added tokens, which `tokenizers` (like llama.cpp) always splits out of the text. Phi-3's
    # rstrip is left to Tokenizer: `tokenizers` strips Unicode whitespace, llama.cpp only ASCII.
    special, user = [], []
    for t, kind in zip(vocab.tokens, vocab.types):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            added = AddedToken(t, special=kind != USER_DEFINED, normalized=False)
            (user if kind == USER_DEFINED else special).append(added)
    hf.add_special_tokens(special)
    hf.add_tokens(user)
