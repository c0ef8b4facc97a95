"""The project's shared test data beside the clones (/work/shared: llama.cpp's vocab-only GGUF files, chat
templates). Every test finds it here, and a test that needs a file fails loudly when it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DIR = Path("/work/shared")
VOCAB_DIR = SHARED_DIR / "vocab"
TEMPLATES_DIR = SHARED_DIR / "templates"


def vocab_files() -> list[Path]:
    """The vocab-only GGUF files; fails the calling test when there are none."""
    files = sorted(VOCAB_DIR.glob("*.gguf"))
    if not files:
        pytest.fail(f"no vocab-only GGUF files in {VOCAB_DIR}: the shared test data is missing")
    return files
