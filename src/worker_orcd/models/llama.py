"""The Llama family: GGUF architectures `llama` (Llama 2/3, SmolLM2, TinyLlama), `qwen2`, `phi3`.

x += attn(rmsnorm(x)); x += ffn(rmsnorm(x)) with RoPE, grouped-query attention and a SwiGLU FFN.
What differs: qwen2 has q/k/v biases; phi3 fuses qkv and gate|up; `llama` files have Q/K rows
permuted by the converter so RoPE rotates adjacent pairs (NORM), the others rotate halves (NEOX).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker_orcd.engine.kv_cache import KVCache, SeqSpan, kv_dtype, single_sequence
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels.activations import swiglu
from worker_orcd.kernels.attention import cached_attention
from worker_orcd.kernels.norm import rms_norm
from worker_orcd.kernels.rope import RopeConfig, cos_sin, inv_freq, rotate_qkv
from worker_orcd.models.common import batch_inputs, static_plans, window_plans
from worker_orcd.models.hparams import HParams
from worker_orcd.models.weights import Weights, fuse_bias, fuse_rows, linear
from worker_orcd.quant import QuantTensor

NEOX_ARCHES = {"qwen2", "phi3"}
ARCHITECTURES = ("llama", "qwen2", "phi3")


@dataclass(frozen=True)
class LlamaConfig:
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
    rope_dims: int
    rope_orig_ctx: int  # phi3 LongRoPE: beyond this context the long factors apply
    rope_attn_factor: float
    tied_embeddings: bool

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> LlamaConfig:
        hp = HParams(f)
        dim = hp.int("embedding_length")
        n_heads = hp.int("attention.head_count")
        n_kv = hp.int("attention.head_count_kv", default=n_heads)
        hp.require(dim % n_heads == 0 or hp.has("attention.key_length"), f"{dim=} not divisible by {n_heads=}")
        head_dim = hp.int("attention.key_length", default=dim // n_heads)
        hp.require(n_heads % n_kv == 0, f"head_count {n_heads} not a multiple of head_count_kv {n_kv}")
        embd = f.tensors.get("token_embd.weight")
        hp.require(embd is not None, "tensor token_embd.weight is missing")
        ctx = hp.int("context_length")
        rope_dims = hp.int("rope.dimension_count", default=head_dim)
        hp.require(rope_dims <= head_dim and rope_dims % 2 == 0, f"rope.dimension_count {rope_dims} vs {head_dim=}")
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
            context_length=ctx,
            rope_base=hp.float("rope.freq_base", default=10000.0),
            rope_dims=rope_dims,
            rope_orig_ctx=hp.int("rope.scaling.original_context_length", default=ctx),
            rope_attn_factor=hp.float("rope.scaling.attn_factor", default=1.0),
            tied_embeddings="output.weight" not in f.tensors,
        )


@dataclass
class LlamaLayer:
    attn_norm: torch.Tensor
    wq: QuantTensor | None
    wk: QuantTensor | None
    wv: QuantTensor | None
    wqkv: QuantTensor | None  # q|k|v rows in one matrix (phi3's file layout; fused at load for the others)
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bqkv: torch.Tensor | None
    wo: QuantTensor
    ffn_norm: torch.Tensor
    w_gate: QuantTensor | None
    w_up: QuantTensor  # gate|up rows in one matrix when w_gate is None (phi3's layout; fused at load otherwise)
    w_down: QuantTensor

    def fuse(self) -> None:
        """Fewer, larger matmuls: q|k|v and gate|up each become one matrix when their formats match."""
        if self.wqkv is None and (qkv := fuse_rows(self.wq, self.wk, self.wv)) is not None:
            self.wqkv, self.bqkv = qkv, fuse_bias(self.bq, self.bk, self.bv)
            self.wq = self.wk = self.wv = self.bq = self.bk = self.bv = None
        if self.w_gate is not None and (gate_up := fuse_rows(self.w_gate, self.w_up)) is not None:
            self.w_gate, self.w_up = None, gate_up


class LlamaModel:
    def __init__(self, cfg: LlamaConfig, w: Weights, max_len: int | None = None):
        self.cfg = cfg
        self.device = w.device
        D, H, Hkv, hd, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        self.tok_embd = w.matrix("token_embd.weight", (cfg.vocab_size, D))
        self.output_norm = w.vector("output_norm.weight")
        self.output = self.tok_embd if cfg.tied_embeddings else w.matrix("output.weight", (cfg.vocab_size, D))
        fused = "blk.0.attn_qkv.weight" in w
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            self.layers.append(LlamaLayer(
                attn_norm=w.vector(p + "attn_norm.weight"),
                wq=None if fused else w.matrix(p + "attn_q.weight", (H * hd, D)),
                wk=None if fused else w.matrix(p + "attn_k.weight", (Hkv * hd, D)),
                wv=None if fused else w.matrix(p + "attn_v.weight", (Hkv * hd, D)),
                wqkv=w.matrix(p + "attn_qkv.weight", ((H + 2 * Hkv) * hd, D)) if fused else None,
                bq=w.get(p + "attn_q.bias"),
                bk=w.get(p + "attn_k.bias"),
                bv=w.get(p + "attn_v.bias"),
                bqkv=None,
                wo=w.matrix(p + "attn_output.weight", (D, H * hd)),
                ffn_norm=w.vector(p + "ffn_norm.weight"),
                w_gate=None if fused else w.matrix(p + "ffn_gate.weight", (F, D)),
                w_up=w.matrix(p + "ffn_up.weight", (2 * F if fused else F, D)),
                w_down=w.matrix(p + "ffn_down.weight", (D, F)),
            ))
            self.layers[-1].fuse()
        self.rope = self._rope(cfg, w, max_len or cfg.context_length)
        self.freq = inv_freq(self.rope, self.device)
        self.scale = hd**-0.5

    @staticmethod
    def _rope(cfg: LlamaConfig, w: Weights, max_len: int) -> RopeConfig:
        factors = w.get("rope_freqs.weight")  # llama3-style per-dim frequency divisors
        if "rope_factors_long.weight" in w:  # phi3 LongRoPE: long factors only past the original context
            long = max_len > cfg.rope_orig_ctx
            factors = w.get("rope_factors_long.weight" if long else "rope_factors_short.weight")
        return RopeConfig(
            n_rot=cfg.rope_dims,
            base=cfg.rope_base,
            neox=cfg.architecture in NEOX_ARCHES,
            freq_factors=factors,
            attn_factor=cfg.rope_attn_factor,
        )

    def new_kv_cache(self, max_len: int, n_slots: int = 1, dtype: torch.dtype | None = None,
                     n_blocks: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_len, n_slots, dtype or kv_dtype(self.device),
                       self.device, n_blocks=n_blocks)

    def _qkv(self, layer: LlamaLayer, h: torch.Tensor) -> torch.Tensor:
        """q|k|v heads side by side: [T, H + 2*Hkv, head_dim]."""
        if layer.wqkv is not None:
            qkv = linear(h, layer.wqkv, layer.bqkv)
        else:
            qkv = torch.cat([linear(h, layer.wq, layer.bq), linear(h, layer.wk, layer.bk),
                             linear(h, layer.wv, layer.bv)], dim=-1)
        return qkv.reshape(h.shape[0], -1, self.cfg.head_dim)

    def _rotated_qkv(
        self, layer: LlamaLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache, i: int, plan
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """q [T, H, hd], k and v [T, Hkv, hd], with q and k rotated in one call (they are adjacent heads); k and
        v None when already in layer i's KV blocks (rope.rotate_qkv)."""
        c = self.cfg
        return rotate_qkv(self._qkv(layer, h), cos, sin, c.rope_dims, self.rope.neox, c.n_heads, kv, i, plan)

    def _ffn(self, layer: LlamaLayer, h: torch.Tensor) -> torch.Tensor:
        if layer.w_gate is None:
            gate, up = linear(h, layer.w_up).chunk(2, dim=-1)
        else:
            gate, up = linear(h, layer.w_gate), linear(h, layer.w_up)
        return linear(swiglu(gate, up), layer.w_down)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [T] token ids of one or more sequences, each contiguous
        positions: torch.Tensor,  # [T]
        kv: KVCache,
        seqs: list[SeqSpan] | None = None,
        logit_rows: torch.Tensor | None = None,  # which of the T rows need logits (None: all)
    ) -> torch.Tensor:
        plans = window_plans(positions, seqs or single_sequence(len(tokens)), None, kv)
        tokens, positions, seqs = batch_inputs(tokens, positions, seqs, self.device)
        return self._run(tokens, positions, kv, plans[None], logit_rows)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """One new token per sequence (slots [B], all on the device), never syncing with the host, so
        engine/cuda_graphs.py can capture it; every slot's blocks must be prepared. [B, vocab] float32."""
        return self._run(tokens, positions, kv, static_plans(kv, slots, positions, None)[None], None)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVCache, plan,
             logit_rows: torch.Tensor | None) -> torch.Tensor:
        c = self.cfg
        cos, sin = cos_sin(self.rope, positions, self.freq)
        x = self.tok_embd.embedding(tokens)  # [T, D]
        for i, layer in enumerate(self.layers):
            q, k, v = self._rotated_qkv(layer, rms_norm(x, layer.attn_norm, c.norm_eps), cos, sin, kv, i, plan)
            out = cached_attention(q, k, v, kv, i, plan, self.scale)
            x = x + linear(out.reshape(x.shape[0], -1), layer.wo)
            x = x + self._ffn(layer, rms_norm(x, layer.ffn_norm, c.norm_eps))
        if logit_rows is not None:
            x = x[logit_rows]
        return linear(rms_norm(x, self.output_norm, c.norm_eps), self.output, out_dtype=torch.float32).float()
