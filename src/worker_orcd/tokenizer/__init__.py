"""Tokenizers built from GGUF metadata or a tokenizer.json, with llama.cpp's tokenization semantics.

`load_tokenizer(path)` reads either; `Tokenizer.from_gguf(f)` takes an open GGUFFile. Chat
templates (jinja2) and the GPT-OSS harmony parser load on first use.
"""

from worker_orcd.tokenizer.errors import TokenizerError
from worker_orcd.tokenizer.stream import StreamDecoder
from worker_orcd.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["StreamDecoder", "Tokenizer", "TokenizerError", "load_tokenizer"]
