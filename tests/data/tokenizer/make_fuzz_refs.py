"""Write llamacpp_fuzz.json: random mixed-script texts and llama.cpp's ids for them, per vocabulary.

Run with a Python that has llama-cpp-python (vocab_only loads no weights):
    python tests/data/tokenizer/make_fuzz_refs.py MODELS.json
where MODELS.json maps a name to a GGUF path, e.g. {"gpt-2": "/work/shared/vocab/ggml-vocab-gpt-2.gguf"}.
"""

import json
import random
import sys
from pathlib import Path

import llama_cpp

PIECES = [
    "abcXYZ",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\n",
    "\u00a0",
    "\u2009",
    "\u3000",
    "\u0085",
    "'s",
    "'LL",
    "'re",
    "123",
    "4567",
    "é",
    "ß",
    "É",
    "ǅ",
    "ﬁ",
    "😀",
    "👨‍👩‍👧",
    "🇫🇷",
    "中文",
    "ひらがな",
    "한국",
    "العربية",
    "हिन्दी",
    "ก่",
    "\u0301",
    "\u200d",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<s>",
    "</s>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|eot_id|>",
    "<|begin_of_text|>",
    "▁",
    "▁▁",
    "...",
    "!!",
    "?",
    "--",
    "==",
    "{",
    "}",
    "(",
    ")",
    '"',
    "'",
    "`",
    "$",
    "+",
    "<",
    ">",
    "|",
    "~",
    "^",
    "\\",
    "/",
    "#",
    "@",
    "%",
    "&",
    "*",
    "_",
    "\x00",
    "\x07",
    "\x7f",
    "\ufeff",
    "🧑\u200d💻",
    "Ω",
    "∑",
    "€",
    "½",
    "²",
    "①",
    "٣",
    "Ⅻ",
    "Hello",
    "world",
    "the",
    "DON'T",
    "naïve",
    "café",
    "Straße",
    "ÉCOLE",
    "helloÉcole",
]


def random_texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = [rng.choice(PIECES) for _ in range(rng.randint(1, 10))]
        texts.append(("" if rng.random() < 0.5 else " ").join(parts))
    for _ in range(n // 4):
        ranges = [
            (32, 0x2FF),
            (0x370, 0x3000),
            (0x4E00, 0x9FFF),
            (0x1F300, 0x1FAFF),
            (0xE000, 0x10FFFF),
        ]
        texts.append(
            "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 8)))
        )
    return texts


def main() -> None:
    models = json.loads(Path(sys.argv[1]).read_text())
    texts = random_texts(250)
    out = {"llama_cpp_python": llama_cpp.__version__, "texts": texts, "ids": {}}
    for name, path in models.items():
        llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        out["ids"][name] = [
            [llm.tokenize(t.encode(), add_bos=False, special=s) for t in texts]
            for s in (False, True)
        ]
    dest = Path(__file__).with_name("llamacpp_fuzz.json")
    dest.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")))


if __name__ == "__main__":
    main()
