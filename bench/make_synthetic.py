"""Write a GGUF with exactly GPT-OSS-20B's (or 120B's) shapes and types, filled with random weights.

For the speed work: the published GGUF's layout (MXFP4 experts; attention, token_embd and output in
Q8_0; norms, biases, router and sinks in F32) with scales in a realistic range, a full-size
byte-level vocab (201,088 tokens, harmony special tokens at their real ids), streamed to disk one
tensor at a time so memory stays low.

Usage: python bench/make_synthetic.py OUT.gguf [--shape 20b|120b] [--dense q8_0|bf16] [--layers N] [--seed S]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T


@dataclass(frozen=True)
class Shape:
    layers: int
    experts: int
    dim: int = 2880
    expert_dim: int = 2880
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    vocab: int = 201088
    experts_used: int = 4
    window: int = 128
    context: int = 131072


SHAPES = {"20b": Shape(layers=24, experts=32), "120b": Shape(layers=36, experts=128)}
SPECIAL = {  # GPT-OSS (o200k_harmony) special tokens at their real ids
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
}
FIRST_SPECIAL = 199998


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def vocab(shape: Shape, rng: np.random.Generator) -> tuple[list[str], list[str], np.ndarray]:
    """256 byte tokens, every 2-byte merge, random distinct 3-byte merges up to the size, then specials."""
    sym = byte_symbols()
    tokens = list(sym)
    merges = [f"{a} {b}" for a in sym for b in sym]
    tokens += [a + b for a in sym for b in sym]
    need = FIRST_SPECIAL - len(tokens)
    picks = rng.choice(256 * 256 * 256, size=need, replace=False)  # (2-byte token, byte) pairs, distinct
    for p in picks.tolist():
        left, right = sym[p >> 16] + sym[(p >> 8) & 255], sym[p & 255]
        merges.append(f"{left} {right}")
        tokens.append(left + right)
    types = np.ones(shape.vocab, dtype=np.int32)  # 1: normal
    for i in range(FIRST_SPECIAL, shape.vocab):
        tokens.append(SPECIAL.get(i, f"<|reserved_{i}|>"))
        types[i] = 3  # control
    return tokens, merges, types


def random_blocks(rng: np.random.Generator, gtype: T, rows: int, cols: int) -> np.ndarray:
    """Random bytes for a [rows, cols] tensor in `gtype`, with the scale fields set to sane values."""
    block, size = gguf.GGML_QUANT_SIZES[gtype]
    nb = rows * cols // block
    raw = np.frombuffer(rng.bytes(nb * size), dtype=np.uint8).reshape(nb, size).copy()
    if gtype == T.MXFP4:  # E8M0 scale byte first: 2^-9 .. 2^-3
        raw[:, 0] = rng.integers(118, 125, nb, dtype=np.uint8)
    elif gtype == T.Q8_0:  # f16 scale first
        raw[:, 0:2] = rng.uniform(0.0005, 0.004, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    elif gtype == T.BF16:
        vals = (rng.standard_normal(rows * cols, dtype=np.float32) * 0.02).view(np.uint32) >> 16
        raw = vals.astype(np.uint16).view(np.uint8)
    return raw.reshape(rows, -1)


def tensor_plan(s: Shape, dense: T) -> list[tuple[str, T, tuple[int, ...]]]:
    """(name, type, torch-order shape) for every tensor, as llama.cpp's converter names them."""
    plan = [("token_embd.weight", dense, (s.vocab, s.dim))]
    for i in range(s.layers):
        p = f"blk.{i}."
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        plan += [
            (p + "attn_norm.weight", T.F32, (s.dim,)),
            (p + "attn_q.weight", dense, (q, s.dim)), (p + "attn_q.bias", T.F32, (q,)),
            (p + "attn_k.weight", dense, (kv, s.dim)), (p + "attn_k.bias", T.F32, (kv,)),
            (p + "attn_v.weight", dense, (kv, s.dim)), (p + "attn_v.bias", T.F32, (kv,)),
            (p + "attn_output.weight", dense, (s.dim, q)), (p + "attn_output.bias", T.F32, (s.dim,)),
            (p + "attn_sinks.weight", T.F32, (s.heads,)),
            (p + "post_attention_norm.weight", T.F32, (s.dim,)),
            (p + "ffn_gate_inp.weight", T.F32, (s.experts, s.dim)), (p + "ffn_gate_inp.bias", T.F32, (s.experts,)),
            (p + "ffn_gate_exps.weight", T.MXFP4, (s.experts, s.expert_dim, s.dim)),
            (p + "ffn_gate_exps.bias", T.F32, (s.experts, s.expert_dim)),
            (p + "ffn_up_exps.weight", T.MXFP4, (s.experts, s.expert_dim, s.dim)),
            (p + "ffn_up_exps.bias", T.F32, (s.experts, s.expert_dim)),
            (p + "ffn_down_exps.weight", T.MXFP4, (s.experts, s.dim, s.expert_dim)),
            (p + "ffn_down_exps.bias", T.F32, (s.experts, s.dim)),
        ]
    plan += [("output_norm.weight", T.F32, (s.dim,)), ("output.weight", dense, (s.vocab, s.dim))]
    return plan


def tensor_data(rng: np.random.Generator, name: str, gtype: T, shape: tuple[int, ...]) -> np.ndarray:
    if gtype == T.F32:
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    rows = int(np.prod(shape[:-1]))
    return random_blocks(rng, gtype, rows, shape[-1])


def write(out: Path, s: Shape, dense: T, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), "gpt-oss")
    w.add_name(f"synthetic gpt-oss {s.layers} layers x {s.experts} experts")
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.dim)
    w.add_feed_forward_length(s.expert_dim)
    w.add_expert_feed_forward_length(s.expert_dim)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(150000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_sliding_window(s.window)
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.experts_used)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if dense == T.Q8_0 else gguf.LlamaFileType.MOSTLY_BF16)
    tokens, merges, types = vocab(s, rng)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types(types.tolist())
    w.add_token_merges(merges)
    w.add_bos_token_id(199998)
    w.add_eos_token_id(200002)
    w.add_pad_token_id(199999)
    w.add_add_bos_token(False)
    plan = tensor_plan(s, dense)
    for name, gtype, shape in plan:
        block, size = gguf.GGML_QUANT_SIZES[gtype]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        nbytes = int(np.prod(byte_shape))
        if gtype == T.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=gtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, gtype, shape in plan:
        data = tensor_data(rng, name, gtype, shape)
        w.write_tensor_data(data.reshape(-1) if gtype != T.F32 else data)
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="20b")
    ap.add_argument("--dense", choices=["q8_0", "bf16"], default="q8_0")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick files)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = SHAPES[a.shape]
    if a.layers is not None:
        s = Shape(**{**s.__dict__, "layers": a.layers})
    start = time.perf_counter()
    write(a.out, s, T.Q8_0 if a.dense == "q8_0" else T.BF16, a.seed)
    size = a.out.stat().st_size
    print(f"wrote {a.out}: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
