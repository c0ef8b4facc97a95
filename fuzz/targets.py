"""What one fuzz input goes through, shared by the atheris harnesses and the regression tests.

An input is the bytes of a GGUF file. `check_gguf` opens it, touches every tensor reference, and
runs what `worker-orcd inspect` runs (facts, the NaN/inf scan) and the model config validation;
`check_tokenizer` builds the tokenizer from its metadata, round-trips a few strings and renders the
chat template. A `CLEAN_ERRORS` exception is the file being refused; any other exception, or a
broken invariant (AssertionError), is a finding.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from worker_orcd.gguf import GGUFError, GGUFFile, open_gguf
from worker_orcd.inspect import model_facts, scan_values
from worker_orcd.models.registry import config_for
from worker_orcd.tokenizer import Tokenizer, TokenizerError
from worker_orcd.tokenizer.sandbox import RenderLimits

CLEAN_ERRORS = (GGUFError, TokenizerError)
TEXTS = ["Hello world", " the  end\n\n", "é 日本語 ✓ \U0001f600", "<|im_start|>user\nhi<|im_end|>", "<s></s>",
         "\t 12345 x", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|>"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
# Rendering limits for fuzzing: a template that runs away is refused quickly.
FUZZ_LIMITS = RenderLimits(timeout_s=0.25, max_chars=1 << 20, budget_bytes=32 << 20)


class Scratch:
    """One file rewritten per input (the reader maps a path). It is unlinked at once and reached through
    /proc/self/fd, so nothing is left behind however the fuzzer exits; in /dev/shm when there is one."""

    def __init__(self) -> None:
        shm = Path("/dev/shm")
        self._fd, name = tempfile.mkstemp(prefix="fuzz-", suffix=".gguf", dir=shm if shm.is_dir() else None)
        os.unlink(name)
        self.path = Path(f"/proc/self/fd/{self._fd}")

    def write(self, data: bytes) -> Path:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        return self.path


def check_gguf(path: Path) -> None:
    """Open, reference every tensor, inspect (facts and value scan), validate the model config."""
    try:
        with open_gguf(path) as f:
            _touch_tensors(f)
            model_facts(f)
            scan_values(f)
            config_for(f)
    except CLEAN_ERRORS:
        pass


def _touch_tensors(f: GGUFFile) -> None:
    for name, ref in f.tensors.items():
        raw = f.tensor_bytes(name)
        assert len(raw) == ref.nbytes and ref.offset + ref.nbytes <= f.file_size, name
        if ref.nbytes:
            raw[0], raw[-1]  # noqa: B018 - the first and last byte must be readable


def check_tokenizer(path: Path) -> None:
    """Build the tokenizer from the file's metadata and use it; refusals are fine."""
    try:
        with open_gguf(path) as f:
            tok = Tokenizer.from_gguf(f)
        exercise_tokenizer(tok)
    except CLEAN_ERRORS:
        pass


def exercise_tokenizer(tok: Tokenizer) -> None:
    """Tokenize and detokenize TEXTS every way, stream-decode, render the chat template."""
    for text in TEXTS:
        for parse_special in (False, True):
            ids = tok.tokenize(text, add_special=True, parse_special=parse_special)
            assert all(0 <= i < tok.vocab_size for i in ids), ids
            _check_stream(tok, ids)
    tok.detokenize(range(tok.vocab_size), skip_special=True)
    if tok.chat_template is not None:
        tok.apply_chat_template(MESSAGES, limits=FUZZ_LIMITS)


def _check_stream(tok: Tokenizer, ids: list[int]) -> None:
    for skip_special in (False, True):
        whole = tok.detokenize(ids, skip_special=skip_special)
        dec = tok.stream_decoder(skip_special=skip_special)
        streamed = "".join(dec.push(i) for i in ids) + dec.flush()
        assert streamed == whole, (ids, streamed, whole)
