"""atheris harness: mutated GGUF files through the tokenizer built from their metadata (tokenize,
detokenize, stream-decode, render the chat template).

    python fuzz/fuzz_tokenizer.py [libFuzzer flags] WORK_DIR SEED_DIR    (see fuzz/README.md)

Any exception other than GGUFError/TokenizerError, and any broken invariant, is a crash.
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["worker_orcd"]):
    from fuzz.targets import Scratch, check_tokenizer  # noqa: E402


def main() -> None:
    scratch = Scratch()
    atheris.Setup(sys.argv, lambda data: check_tokenizer(scratch.write(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
