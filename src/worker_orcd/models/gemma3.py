"""Gemma 3 (GGUF architecture `gemma3`), text only.

Differs from Llama: embeddings scaled by sqrt(dim); RMSNorm before *and* after attention and FFN
(GGUF norm weights already hold the +1 transformers adds at run time); per-head RMSNorm on Q and
K; GeGLU (tanh GELU); five sliding-window layers for every global one, the local ones with their
own RoPE base (10000); attention scale from key_length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker_orcd.engine.kv_cache import KVCache, SeqSpan, kv_dtype, single_sequence
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels.activations import geglu
from worker_orcd.kernels.attention import cached_attention
from worker_orcd.kernels.norm import rms_norm
from worker_orcd.kernels.rope import RopeConfig, apply_rope, cos_sin, inv_freq
from worker_orcd.models.common import batch_inputs, window_plans
from worker_orcd.models.hparams import HParams
from worker_orcd.models.weights import Weights, linear
from worker_orcd.quant import QuantTensor

ARCHITECTURES = ("gemma3",)
LOCAL_ROPE_BASE = 10000.0
SWA_PATTERN = 6  # layer i is global when (i + 1) % 6 == 0


@dataclass(frozen=True)
class Gemma3Config:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    context_length: int
    rope_base: float
    rope_scale: float  # linear position scaling of the global layers (1 = none)
    sliding_window: int

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Gemma3Config:
        hp = HParams(f)
        n_heads = hp.int("attention.head_count")
        n_kv = hp.int("attention.head_count_kv", default=n_heads)
        hp.require(n_heads % n_kv == 0, f"head_count {n_heads} not a multiple of head_count_kv {n_kv}")
        dim = hp.int("embedding_length")
        head_dim = hp.int("attention.key_length", default=dim // n_heads)
        hp.require(hp.int("attention.value_length", default=head_dim) == head_dim, "key_length != value_length")
        embd = f.tensors.get("token_embd.weight")
        hp.require(embd is not None, "tensor token_embd.weight is missing")
        scaling = hp.str("rope.scaling.type", default="none")
        return cls(
            architecture=hp.arch,
            vocab_size=embd.shape[0],
            dim=dim,
            n_layers=hp.int("block_count"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn_dim=hp.int("feed_forward_length"),
            norm_eps=hp.float("attention.layer_norm_rms_epsilon"),
            context_length=hp.int("context_length"),
            rope_base=hp.float("rope.freq_base", default=1_000_000.0),
            rope_scale=hp.float("rope.scaling.factor", default=1.0) if scaling == "linear" else 1.0,
            sliding_window=hp.int("attention.sliding_window"),
        )

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % SWA_PATTERN == 0


@dataclass
class Gemma3Layer:
    attn_norm: torch.Tensor
    wq: QuantTensor
    wk: QuantTensor
    wv: QuantTensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    wo: QuantTensor
    post_attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate: QuantTensor
    w_up: QuantTensor
    w_down: QuantTensor
    post_ffn_norm: torch.Tensor


class Gemma3Model:
    def __init__(self, cfg: Gemma3Config, w: Weights, max_len: int | None = None):
        self.cfg = cfg
        self.device = w.device
        D, H, Hkv, hd, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        self.tok_embd = w.matrix("token_embd.weight", (cfg.vocab_size, D))
        self.output_norm = w.vector("output_norm.weight")
        self.output = w.matrix("output.weight", (cfg.vocab_size, D)) if "output.weight" in w else self.tok_embd
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            self.layers.append(Gemma3Layer(
                attn_norm=w.vector(p + "attn_norm.weight"),
                wq=w.matrix(p + "attn_q.weight", (H * hd, D)),
                wk=w.matrix(p + "attn_k.weight", (Hkv * hd, D)),
                wv=w.matrix(p + "attn_v.weight", (Hkv * hd, D)),
                q_norm=w.vector(p + "attn_q_norm.weight"),
                k_norm=w.vector(p + "attn_k_norm.weight"),
                wo=w.matrix(p + "attn_output.weight", (D, H * hd)),
                post_attn_norm=w.vector(p + "post_attention_norm.weight"),
                ffn_norm=w.vector(p + "ffn_norm.weight"),
                w_gate=w.matrix(p + "ffn_gate.weight", (F, D)),
                w_up=w.matrix(p + "ffn_up.weight", (F, D)),
                w_down=w.matrix(p + "ffn_down.weight", (D, F)),
                post_ffn_norm=w.vector(p + "post_ffw_norm.weight"),
            ))
        self.rope_local = RopeConfig(n_rot=hd, base=LOCAL_ROPE_BASE, neox=True)
        self.rope_global = RopeConfig(n_rot=hd, base=cfg.rope_base, neox=True)
        # linear scaling divides positions, i.e. every frequency, by the factor
        self.freq_local = inv_freq(self.rope_local, self.device)
        self.freq_global = inv_freq(self.rope_global, self.device) / cfg.rope_scale
        self.scale = hd**-0.5
        self.embed_scale = D**0.5

    def new_kv_cache(self, max_len: int, n_slots: int = 1, dtype: torch.dtype | None = None,
                     n_blocks: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_len, n_slots, dtype or kv_dtype(self.device),
                       self.device, n_blocks=n_blocks)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        seqs: list[SeqSpan] | None = None,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        c = self.cfg
        T = tokens.shape[0]
        plans = window_plans(positions, seqs or single_sequence(len(tokens)), c.sliding_window, kv)
        tokens, positions, seqs = batch_inputs(tokens, positions, seqs, self.device)
        rope = {
            False: cos_sin(self.rope_local, positions, self.freq_local),
            True: cos_sin(self.rope_global, positions, self.freq_global),
        }
        x = self.tok_embd.embedding(tokens) * self.embed_scale  # [T, D]
        for i, layer in enumerate(self.layers):
            is_global = c.is_global(i)
            cos, sin = rope[is_global]
            h = rms_norm(x, layer.attn_norm, c.norm_eps)
            q = rms_norm(linear(h, layer.wq).reshape(T, c.n_heads, c.head_dim), layer.q_norm, c.norm_eps)
            k = rms_norm(linear(h, layer.wk).reshape(T, c.n_kv_heads, c.head_dim), layer.k_norm, c.norm_eps)
            v = linear(h, layer.wv).reshape(T, c.n_kv_heads, c.head_dim)
            q = apply_rope(q, cos, sin, c.head_dim, neox=True)
            k = apply_rope(k, cos, sin, c.head_dim, neox=True)
            out = cached_attention(q, k, v, kv, i, plans[None if is_global else c.sliding_window], self.scale)
            x = x + rms_norm(linear(out.reshape(T, -1), layer.wo), layer.post_attn_norm, c.norm_eps)
            h = rms_norm(x, layer.ffn_norm, c.norm_eps)
            y = linear(geglu(linear(h, layer.w_gate), linear(h, layer.w_up)), layer.w_down)
            x = x + rms_norm(y, layer.post_ffn_norm, c.norm_eps)
        if logit_rows is not None:
            x = x[logit_rows]
        return linear(rms_norm(x, self.output_norm, c.norm_eps), self.output, out_dtype=torch.float32).float()
