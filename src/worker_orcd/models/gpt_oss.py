"""GPT-OSS (GGUF architecture `gpt-oss`): attention with sinks, alternating sliding window, YaRN
RoPE, and a mixture of experts with MXFP4 weights and a clamped SwiGLU.

Per block: x += attn(rmsnorm(x)); x += moe(rmsnorm(x)). Even layers attend within the sliding
window, odd layers to everything. The router picks the top-k experts per token and softmaxes
over those k logits only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from worker_orcd.engine.kv_cache import KVCache, SeqSpan, kv_dtype, single_sequence
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels.activations import clamped_swiglu
from worker_orcd.kernels.attention import cached_attention
from worker_orcd.kernels.norm import add_rms_norm, rms_norm
from worker_orcd.kernels.rope import RopeConfig, apply_rope, cos_sin, inv_freq, rotate_qkv, yarn_attn_factor
from worker_orcd.models.common import batch_inputs, static_plans, window_plans
from worker_orcd.models.hparams import HParams
from worker_orcd.models.weights import Weights, fuse_bias, fuse_rows, linear
from worker_orcd.quant import GGMLType, QuantTensor

if TYPE_CHECKING:
    from worker_orcd.kernels.triton_quant import Partials

ARCHITECTURES = ("gpt-oss",)
SWIGLU_LIMIT = 7.0
SWIGLU_ALPHA = 1.702


@dataclass(frozen=True)
class GptOssConfig:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    expert_dim: int
    norm_eps: float
    context_length: int
    sliding_window: int
    rope_base: float
    rope_scale: float
    rope_orig_ctx: int
    yarn_beta_fast: float
    yarn_beta_slow: float

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> GptOssConfig:
        hp = HParams(f)
        n_heads = hp.int("attention.head_count")
        n_kv = hp.int("attention.head_count_kv", default=n_heads)
        hp.require(n_heads % n_kv == 0, f"head_count {n_heads} not a multiple of head_count_kv {n_kv}")
        dim = hp.int("embedding_length")
        head_dim = hp.int("attention.key_length", default=dim // n_heads)
        hp.require(hp.int("attention.value_length", default=head_dim) == head_dim, "key_length != value_length")
        n_exp, n_used = hp.int("expert_count"), hp.int("expert_used_count")
        hp.require(n_used <= n_exp, f"expert_used_count {n_used} > expert_count {n_exp}")
        embd = f.tensors.get("token_embd.weight")
        hp.require(embd is not None, "tensor token_embd.weight is missing")
        gate = f.tensors.get("blk.0.ffn_gate_exps.weight")
        hp.require(gate is not None, "tensor blk.0.ffn_gate_exps.weight is missing")
        ctx = hp.int("context_length")
        scaling = hp.str("rope.scaling.type", default="none")
        return cls(
            architecture=hp.arch,
            vocab_size=embd.shape[0],
            dim=dim,
            n_layers=hp.int("block_count"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            n_experts=n_exp,
            n_experts_used=n_used,
            expert_dim=hp.int("expert_feed_forward_length", default=gate.shape[1]),
            norm_eps=hp.float("attention.layer_norm_rms_epsilon"),
            context_length=ctx,
            sliding_window=hp.int("attention.sliding_window"),
            rope_base=hp.float("rope.freq_base", default=150000.0),
            rope_scale=hp.float("rope.scaling.factor", default=1.0) if scaling == "yarn" else 1.0,
            rope_orig_ctx=hp.int("rope.scaling.original_context_length", default=ctx),
            yarn_beta_fast=hp.float("rope.scaling.yarn_beta_fast", default=32.0),
            yarn_beta_slow=hp.float("rope.scaling.yarn_beta_slow", default=1.0),
        )

    def is_sliding(self, layer: int) -> bool:
        return layer % 2 == 0


@dataclass
class GptOssLayer:
    attn_norm: torch.Tensor
    wq: QuantTensor
    bq: torch.Tensor
    wk: QuantTensor
    bk: torch.Tensor
    wv: QuantTensor
    bv: torch.Tensor
    wo: QuantTensor
    bo: torch.Tensor
    sinks: torch.Tensor
    ffn_norm: torch.Tensor
    router: QuantTensor
    router_b: torch.Tensor
    gate: QuantTensor  # [experts, expert_dim, dim]
    gate_b: torch.Tensor  # [experts, expert_dim]
    up: QuantTensor
    up_b: torch.Tensor
    down: QuantTensor  # [experts, dim, expert_dim]
    down_b: torch.Tensor  # [experts, dim]
    wqkv: QuantTensor | None = None  # q|k|v rows in one matrix when their formats match (fused at load)
    bqkv: torch.Tensor | None = None

    def fuse(self) -> None:
        """One matmul (and one bias add) for q, k and v."""
        if (qkv := fuse_rows(self.wq, self.wk, self.wv)) is not None:
            self.wqkv, self.bqkv = qkv, fuse_bias(self.bq, self.bk, self.bv)


def expert(w: QuantTensor, e: int) -> QuantTensor:
    """Expert e's matrix out of a stacked [experts, rows, cols] tensor, still in its block format."""
    return w.stacked(e)


class GptOssModel:
    def __init__(self, cfg: GptOssConfig, w: Weights, max_len: int | None = None):
        self.cfg = cfg
        self.device = w.device
        D, H, Hkv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        E, F = cfg.n_experts, cfg.expert_dim
        self.tok_embd = w.matrix("token_embd.weight", (cfg.vocab_size, D))
        self.output_norm = w.vector("output_norm.weight")
        self.output = w.matrix("output.weight", (cfg.vocab_size, D)) if "output.weight" in w else self.tok_embd
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            self.layers.append(GptOssLayer(
                attn_norm=w.vector(p + "attn_norm.weight"),
                wq=w.matrix(p + "attn_q.weight", (H * hd, D)), bq=w.vector(p + "attn_q.bias"),
                wk=w.matrix(p + "attn_k.weight", (Hkv * hd, D)), bk=w.vector(p + "attn_k.bias"),
                wv=w.matrix(p + "attn_v.weight", (Hkv * hd, D)), bv=w.vector(p + "attn_v.bias"),
                wo=w.matrix(p + "attn_output.weight", (D, H * hd)), bo=w.vector(p + "attn_output.bias"),
                sinks=w.vector(p + "attn_sinks.weight"),
                ffn_norm=w.vector(p + "post_attention_norm.weight"),
                router=w.matrix(p + "ffn_gate_inp.weight", (E, D)), router_b=w.vector(p + "ffn_gate_inp.bias"),
                gate=w.matrix(p + "ffn_gate_exps.weight", (E, F, D)), gate_b=_dense(w[p + "ffn_gate_exps.bias"]),
                up=w.matrix(p + "ffn_up_exps.weight", (E, F, D)), up_b=_dense(w[p + "ffn_up_exps.bias"]),
                down=w.matrix(p + "ffn_down_exps.weight", (E, D, F)), down_b=_dense(w[p + "ffn_down_exps.bias"]),
            ))
            if self.device.type == "cuda":  # on CPU the three matmuls cost the same as one
                self.layers[-1].fuse()
        self.rope = RopeConfig(
            n_rot=hd, base=cfg.rope_base, neox=True, yarn_factor=cfg.rope_scale, yarn_orig_ctx=cfg.rope_orig_ctx,
            yarn_beta_fast=cfg.yarn_beta_fast, yarn_beta_slow=cfg.yarn_beta_slow,
            attn_factor=yarn_attn_factor(cfg.rope_scale),
        )
        self.freq = inv_freq(self.rope, self.device)
        self.scale = hd**-0.5

    def new_kv_cache(self, max_len: int, n_slots: int = 1, dtype: torch.dtype | None = None,
                     n_blocks: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_len, n_slots, dtype or kv_dtype(self.device),
                       self.device, n_blocks=n_blocks)

    def _rotated_qkv(
        self, layer: GptOssLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache, i: int,
        plan
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Projections with their biases; q and k rotated (NeoX layout, YaRN tables). [T, heads, head_dim]
        (k and v None: already in layer i's KV blocks, see rope.rotate_qkv)."""
        c, T = self.cfg, h.shape[0]
        H, Hkv = c.n_heads, c.n_kv_heads
        if layer.wqkv is not None:  # on CUDA the split-K sums are added inside the rope launch (rotate_qkv)
            qkv = linear(h, layer.wqkv, layer.bqkv, partials=True)
            if isinstance(qkv, torch.Tensor):
                qkv = qkv.reshape(T, H + 2 * Hkv, c.head_dim)
            return rotate_qkv(qkv, cos, sin, c.head_dim, True, H, kv, i, plan, c.head_dim)
        q = linear(h, layer.wq, layer.bq).reshape(T, H, c.head_dim)
        k = linear(h, layer.wk, layer.bk).reshape(T, Hkv, c.head_dim)
        v = linear(h, layer.wv, layer.bv).reshape(T, Hkv, c.head_dim)
        return apply_rope(q, cos, sin, c.head_dim, True), apply_rope(k, cos, sin, c.head_dim, True), v

    def moe(self, layer: GptOssLayer, h: torch.Tensor, static: bool = False) -> torch.Tensor | Partials:
        """Route each token to its top-k experts; softmax over the k chosen logits; weighted sum. [T, D]

        static: no host sync (CUDA graphs); without the grouped kernel every expert then runs on every token."""
        k = self.cfg.n_experts_used
        router = float32_matrix(layer.router) if h.is_cuda else None
        if router is not None:  # logits, top-k and softmax in one launch (kernels/triton_router.py)
            from worker_orcd.kernels.triton_router import route

            top_ids, weights = route(h, router, layer.router_b, k)
        else:
            logits = linear(h, layer.router, layer.router_b)  # [T, E]
            top_logits, top_ids = torch.topk(logits.float(), k, dim=-1)  # [T, k]
            weights = torch.softmax(top_logits, dim=-1)
        if h.is_cuda and layer.gate.ggml_type == GGMLType.MXFP4:
            from worker_orcd.kernels.triton_moe import moe_grouped

            # routing stays on the device: tokens sorted by expert, one grouped launch per matrix
            # (decode-sized batches: the k x splits partial rows a token, summed inside the next norm's launch)
            return moe_grouped(h, top_ids, weights, layer.gate, layer.gate_b, layer.up, layer.up_b, layer.down,
                               layer.down_b, limit=SWIGLU_LIMIT, alpha=SWIGLU_ALPHA, partials=True)
        if static:
            return self._moe_every_expert(layer, h, top_ids, weights)
        out = torch.zeros_like(h, dtype=torch.float32)
        for e in torch.unique(top_ids).tolist():
            rows, slot = torch.nonzero(top_ids == e, as_tuple=True)
            x = h[rows]
            g = linear(x, expert(layer.gate, e), layer.gate_b[e])
            u = linear(x, expert(layer.up, e), layer.up_b[e])
            y = linear(clamped_swiglu(g, u, SWIGLU_LIMIT, SWIGLU_ALPHA), expert(layer.down, e), layer.down_b[e])
            out.index_add_(0, rows, y.float() * weights[rows, slot, None])
        return out

    def _moe_every_expert(self, layer: GptOssLayer, h: torch.Tensor, top_ids: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by a dense [T, E] routing matrix (zero off the top-k):
        shapes independent of the routing, at E/k times the work. [T, D]"""
        dense = torch.zeros(h.shape[0], self.cfg.n_experts, device=h.device).scatter(1, top_ids, weights)
        out = torch.zeros_like(h, dtype=torch.float32)
        for e in range(self.cfg.n_experts):
            g = linear(h, expert(layer.gate, e), layer.gate_b[e])
            u = linear(h, expert(layer.up, e), layer.up_b[e])
            y = linear(clamped_swiglu(g, u, SWIGLU_LIMIT, SWIGLU_ALPHA), expert(layer.down, e), layer.down_b[e])
            out += y.float() * dense[:, e, None]
        return out

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        seqs: list[SeqSpan] | None = None,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plans = window_plans(positions, seqs or single_sequence(len(tokens)), self.cfg.sliding_window, kv)
        tokens, positions, seqs = batch_inputs(tokens, positions, seqs, self.device)
        return self._run(tokens, positions, kv, plans, logit_rows)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """One new token per sequence (slots [B], all on the device), never syncing with the host, so
        engine/cuda_graphs.py can capture it; every slot's blocks must be prepared. [B, vocab] float32."""
        plans = static_plans(kv, slots, positions, self.cfg.sliding_window)
        return self._run(tokens, positions, kv, plans, None, static=True)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVCache, plans: dict,
             logit_rows: torch.Tensor | None, static: bool = False) -> torch.Tensor:
        c = self.cfg
        T = tokens.shape[0]
        cos, sin = cos_sin(self.rope, positions, self.freq)
        x = self.tok_embd.embedding(tokens)
        f16 = torch.float16  # on CUDA the norms feed the folded decode GEMMs float16 (read as it is; triton_quant)
        h = rms_norm(x, self.layers[0].attn_norm, c.norm_eps, f16)
        for i, layer in enumerate(self.layers):
            plan = plans[c.sliding_window if c.is_sliding(i) else None]
            q, k, v = self._rotated_qkv(layer, h, cos, sin, kv, i, plan)
            out = cached_attention(q, k, v, kv, i, plan, self.scale, sinks=layer.sinks)
            # on CUDA the o projection's split-K sums are added inside the norm launch after it, and so are the MoE's
            # k x splits partial rows (4 x 2 since session 11; session 7's 4 x 8 made that norm slower than a launch)
            y = linear(out.reshape(T, -1), layer.wo, layer.bo, partials=True)
            x, h = add_rms_norm(x, y, layer.ffn_norm, c.norm_eps, f16)
            y = self.moe(layer, h, static)
            # the residual add and the next norm (the output norm after the last layer) in one step
            x, h = add_rms_norm(x, y, (self.layers[i + 1].attn_norm if i + 1 < len(self.layers)
                                       else self.output_norm), c.norm_eps, f16)  # fmt: skip
        if logit_rows is not None:
            h = h[logit_rows]
        return linear(h, self.output, out_dtype=torch.float32).float()


def float32_matrix(w: QuantTensor) -> torch.Tensor | None:
    """An F32 matrix's values as the CUDA kernels hold them (no copy); None for any other format."""
    if w.ggml_type != GGMLType.F32:
        return None
    from worker_orcd.quant.gpu_matmul import packed

    p = packed(w)
    return p.codes if p is not None and p.codes.dtype == torch.float32 else None


def _dense(t: QuantTensor | torch.Tensor) -> torch.Tensor:
    """Expert biases are 2-D [experts, n]: used in float32."""
    return t if isinstance(t, torch.Tensor) else t.dequantize()
