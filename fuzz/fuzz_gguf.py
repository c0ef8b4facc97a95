"""atheris harness: mutated GGUF files through the reader, `inspect` (facts, NaN/inf scan) and config validation.

    python fuzz/fuzz_gguf.py [libFuzzer flags] WORK_DIR SEED_DIR    (see fuzz/README.md)

Any exception other than GGUFError/TokenizerError, and any broken invariant, is a crash.
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["worker_orcd"]):
    from fuzz.targets import Scratch, check_gguf  # noqa: E402


def main() -> None:
    scratch = Scratch()
    atheris.Setup(sys.argv, lambda data: check_gguf(scratch.write(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
