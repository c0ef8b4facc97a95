"""Pre-tokenizer regexes per `tokenizer.ggml.pre`, as llama.cpp's llm_tokenizer_bpe lists them.

llama.cpp applies its list in order, each regex splitting every piece left by the previous one and
keeping the text between matches; `tokenizers`' Split(..., "isolated") does the same. Where
llama.cpp rewrote a regex for std::regex (no \\p{Lu}, no (?i:)), we use the original from the
model's tokenizer.json, which Oniguruma reads as written.
"""

from __future__ import annotations

from worker_orcd.tokenizer.errors import TokenizerError

# GPT-2's regex. llama.cpp lists it without the final `|\s+` but runs its own code for it
# (unicode_regex_split_custom_gpt2), which behaves like the full original.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# o200k (GPT-4o, GPT-OSS harmony). llama.cpp's rewrite treats non-ASCII lowercase letters as
# upper case; the original keeps Unicode case classes.
GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]
_STARCODER = [r"\p{N}", GPT2]

# name in tokenizer.ggml.pre -> (regexes, llama.cpp's ignore_merges, llama.cpp's default add_bos)
PRE_TYPES: dict[str, tuple[list[str], bool, bool]] = {
    "default": (_DEFAULT, False, False),
    "gpt-2": ([GPT2], False, False),
    "phi-2": ([GPT2], False, False),
    "mpt": ([GPT2], False, False),
    "olmo": ([GPT2], False, False),
    "llama3": ([LLAMA3], True, True),
    "llama-v3": ([LLAMA3], True, True),
    "llama-bpe": ([LLAMA3], True, True),
    "falcon3": ([LLAMA3], True, True),
    "dbrx": ([LLAMA3], False, False),
    "smaug-bpe": ([LLAMA3], False, False),
    "qwen2": ([QWEN2], False, False),
    "deepseek-r1-qwen": ([QWEN2], False, False),
    "stablelm2": ([QWEN2], False, False),
    "megrez": ([QWEN2], False, False),
    "smollm": (_STARCODER, False, False),
    "starcoder": (_STARCODER, False, False),
    "refact": (_STARCODER, False, False),
    "gpt-4o": ([GPT4O], False, False),
    "llama4": ([GPT4O], False, False),
}


def pre_type(name: str | None) -> tuple[list[str], bool, bool]:
    """Regexes, ignore_merges and default add_bos for a `tokenizer.ggml.pre` value (None: 'default')."""
    key = "default" if not name else name
    if key not in PRE_TYPES:
        known = ", ".join(sorted(PRE_TYPES))
        raise TokenizerError(f"tokenizer.ggml.pre {name!r} is not supported (known: {known})")
    return PRE_TYPES[key]
