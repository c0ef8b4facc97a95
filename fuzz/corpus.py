"""Seed inputs for the fuzz harnesses: small synthetic GGUF files and shrunken copies of the real ones.

The real models are 90+ MB, too big to mutate byte by byte. A shrunken copy keeps a real file's
metadata (its vocabulary cut to a few hundred tokens, the special tokens kept and ids renumbered,
the chat template as it is) and the tensors of its first two blocks plus the global ones, each cut
to a few blocks of its real bytes, so every seed stays under `MAX_SEED_BYTES`.

    python fuzz/corpus.py OUT_DIR      # writes OUT_DIR/*.gguf
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker_orcd.gguf import GGUFFile, open_gguf  # noqa: E402
from worker_orcd.tokenizer.vocab import BYTE, CONTROL, USER_DEFINED  # noqa: E402

MAX_SEED_BYTES = 128 * 1024
VOCAB_DIR = Path("/work/shared/vocab")
KEEP_TOKENS = 384  # the first ids of a real vocabulary kept in its seed
KEEP_SPECIAL = 24  # control / user-defined tokens kept beyond those
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")

_ARRAY_TYPES = {
    np.dtype(np.uint8): GGUFValueType.UINT8, np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16, np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32, np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(np.bool_): GGUFValueType.BOOL,
    np.dtype(np.uint64): GGUFValueType.UINT64, np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
}


# -- shrinking a real file -------------------------------------------------------------------

def _kept_token_ids(meta: dict[str, Any]) -> list[int]:
    """The first KEEP_TOKENS ids, every byte token, the ids metadata names, and a few special tokens."""
    n = len(meta["tokenizer.ggml.tokens"])
    types = meta.get("tokenizer.ggml.token_type")
    keep = set(range(min(n, KEEP_TOKENS)))
    keep |= {int(v) for k, v in meta.items() if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")
             and isinstance(v, int) and 0 <= v < n}
    if types is not None:
        keep |= {i for i in range(n) if types[i] == BYTE}
        special = [i for i in range(n) if types[i] in (CONTROL, USER_DEFINED) and i not in keep]
        keep |= set(special[:KEEP_SPECIAL])
    return sorted(keep)


def shrink_vocab(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with the vocabulary arrays cut to `_kept_token_ids` and the token id keys renumbered."""
    if not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        return dict(meta)
    ids = _kept_token_ids(meta)
    new_id = {old: new for new, old in enumerate(ids)}
    tokens = [meta["tokenizer.ggml.tokens"][i] for i in ids]
    out = dict(meta)
    out["tokenizer.ggml.tokens"] = tokens
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in meta:
            out[key] = np.asarray(meta[key])[ids]
    for key, value in meta.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and isinstance(value, int):
            out[key] = new_id.get(value, 0)
    if "tokenizer.ggml.merges" in meta:
        kept = set(tokens)
        out["tokenizer.ggml.merges"] = [m for m in meta["tokenizer.ggml.merges"]
                                        if _merge_within(m, kept)]
    return out


def _merge_within(merge: str, kept: set[str]) -> bool:
    left, _, right = merge.partition(" ")
    return left in kept and right in kept and left + right in kept


def _kept_tensor(name: str) -> bool:
    m = _BLOCK_TENSOR.match(name)
    return m is None or int(m.group(1)) < 2


def _tiny_shape(ne: tuple[int, ...], gtype: GGMLQuantizationType) -> tuple[int, ...]:
    """ggml-order shape of at most two blocks per row and two rows: same rank, same type."""
    block = GGML_QUANT_SIZES[gtype][0]
    first = block * (2 if block > 1 else 32)
    return (min(ne[0], first), *(min(d, 2) for d in ne[1:]))


def write_shrunken(f: GGUFFile, out: Path) -> Path:
    """A small GGUF with `f`'s metadata (vocabulary shrunk) and its first tensors, a few blocks each."""
    meta = shrink_vocab(f.metadata)
    w = gguf.GGUFWriter(out, f.get("general.architecture", "llama"))
    for key, value in meta.items():
        if key not in ("general.architecture", "general.alignment"):
            _add_value(w, key, value, f.metadata_types[key])
    for name, ref in f.tensors.items():
        if not _kept_tensor(name):
            continue
        ne = _tiny_shape(ref.ne, ref.ggml_type)
        block, size = GGML_QUANT_SIZES[ref.ggml_type]
        nbytes = int(np.prod(ne)) // block * size
        rows = tuple(reversed(ne[1:]))  # torch order; the writer takes quantized rows as bytes
        data = np.array(f.tensor_bytes(name)[:nbytes]).reshape(*rows, ne[0] // block * size)
        w.add_tensor(name, data, raw_dtype=ref.ggml_type)
    _finish(w)
    return out


def _add_value(w: gguf.GGUFWriter, key: str, value: Any, vtype: GGUFValueType) -> None:
    if vtype != GGUFValueType.ARRAY:
        w.add_key_value(key, value, vtype)
    elif isinstance(value, list):
        w.add_key_value(key, value, vtype, sub_type=GGUFValueType.STRING)
    else:
        w.add_key_value(key, value.tolist(), vtype, sub_type=_ARRAY_TYPES[value.dtype])


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- small synthetic files -------------------------------------------------------------------

def write_toy_gpt2(out: Path) -> Path:
    """The tiny models' byte-level BPE vocabulary (320 tokens), vocab only, with a ChatML template."""
    from tests.fixtures.toy_vocab import toy_vocab

    v = toy_vocab(320)
    w = gguf.GGUFWriter(out, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(list(v.tokens))
    w.add_token_types(list(v.token_types))
    w.add_token_merges(list(v.merges))
    w.add_bos_token_id(v.bos_id)
    w.add_eos_token_id(v.eos_id)
    w.add_chat_template(CHATML)
    _finish(w)
    return out


def write_toy_spm(out: Path) -> Path:
    """A SentencePiece-style vocabulary: unk/bos/eos, 256 byte tokens, a few scored pieces, a template."""
    pieces = ["\u2581", "\u2581t", "he", "\u2581the", "\u2581a", "in", "\u2581in", "er", "\u2581h", "ello",
              "\u2581hello", "\u2581w", "or", "ld", "\u2581world", "\u2581<", "|", "im"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, *[BYTE] * 256, *[1] * len(pieces), CONTROL, CONTROL]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(pieces))), 0.0, 0.0]
    w = gguf.GGUFWriter(out, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHATML)
    _finish(w)
    return out


def _tiny_model_seeds(out_dir: Path) -> Iterator[Path]:
    """The tests' tiny random models (toy vocabulary), shrunk like the real files."""
    try:
        from tests.fixtures.hf_to_gguf import make_tiny_model, write_gguf
    except ImportError:  # transformers is a test dependency
        return
    for arch, qtype in (("llama", "Q8_0"), ("gpt2", "Q8_0"), ("gemma3", "Q4_0"), ("gpt-oss", "MXFP4")):
        with tempfile.TemporaryDirectory() as tmp:
            full = write_gguf(make_tiny_model(arch, seed=0), Path(tmp) / "full.gguf", qtype,
                              dense_type="Q8_0" if qtype == "MXFP4" else None)
            with open_gguf(full) as f:
                yield write_shrunken(f, out_dir / f"tiny-{arch}.gguf")


def _malformed_seeds(out_dir: Path) -> Iterator[Path]:
    """The reader tests' valid corpus file and its precise corruptions."""
    from tests.gguf_corpus import malformed_cases, valid_bytes

    path = out_dir / "corpus-valid.gguf"
    path.write_bytes(valid_bytes())
    yield path
    for case in malformed_cases():
        if case.data:
            path = out_dir / f"corpus-{case.name}.gguf"
            path.write_bytes(case.data)
            yield path


def real_files() -> list[Path]:
    """The real GGUF files present here: the packaged models and the vocab-only files."""
    from worker_orcd.packaged import ModelNotInstalled, default_model_path, gemma3_270m_path

    found = []
    for locate in (default_model_path, gemma3_270m_path):
        try:
            found.append(locate())
        except (ModelNotInstalled, OSError, ValueError):
            pass
    return found + sorted(VOCAB_DIR.glob("*.gguf"))


def _real_seeds(out_dir: Path) -> Iterator[Path]:
    for src in real_files():
        with open_gguf(src) as f:
            yield write_shrunken(f, out_dir / f"real-{src.stem}.gguf")


SEED_SOURCES: dict[str, Callable[[Path], Iterator[Path]]] = {
    "real": _real_seeds,
    "toy": lambda d: iter([write_toy_gpt2(d / "toy-gpt2.gguf"), write_toy_spm(d / "toy-spm.gguf")]),
    "tiny": _tiny_model_seeds,
    "malformed": _malformed_seeds,
}


def build_corpus(out_dir: Path, sources: tuple[str, ...] = tuple(SEED_SOURCES)) -> list[Path]:
    """Write the seeds of `sources` into out_dir; refuse any seed over MAX_SEED_BYTES."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [p for name in sources for p in SEED_SOURCES[name](out_dir)]
    big = [f"{p.name} ({p.stat().st_size} bytes)" for p in written if p.stat().st_size > MAX_SEED_BYTES]
    if big:
        raise ValueError(f"seeds over {MAX_SEED_BYTES} bytes: {', '.join(big)}")
    return written


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="fuzz-seeds-"))
    seeds = build_corpus(out)
    print(f"{len(seeds)} seeds, {sum(p.stat().st_size for p in seeds)} bytes in {out}")


if __name__ == "__main__":
    main(sys.argv)
