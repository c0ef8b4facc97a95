"""atheris harness: GGUF files through the tokenizer built from their metadata (tokenize, detokenize,
stream-decode, render the chat template).

    python fuzz/fuzz_tokenizer.py [libFuzzer flags] WORK_DIR SEED_DIR    (see fuzz/README.md)

Inputs are mutated by `fuzz/mutate.py` (one tokenizer metadata value at a time, file rewritten) and,
a quarter of the time, byte by byte. Any exception other than GGUFError/TokenizerError, and any
broken invariant, is a crash.
"""

import random
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["worker_orcd"]):
    from fuzz.mutate import mutate_metadata, parse, write_vocab_gguf  # noqa: E402
    from fuzz.targets import Scratch, check_tokenizer  # noqa: E402

BYTE_MUTATIONS = 0.25


def main() -> None:
    scratch, parse_scratch = Scratch(), Scratch()

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        parsed = None if rng.random() < BYTE_MUTATIONS else parse(data, parse_scratch)
        if parsed is None:
            return atheris.Mutate(data, max_size)
        meta, types = parsed
        mutate_metadata(meta, types, rng)
        out = write_vocab_gguf(meta, types)
        return out if len(out) <= max_size else atheris.Mutate(data, max_size)

    atheris.Setup(sys.argv, lambda data: check_tokenizer(scratch.write(data)), custom_mutator=mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
