"""GPT-2 (GGUF architecture `gpt2`): learned absolute positions, LayerNorm with bias, fused QKV
with bias, multi-head attention, GELU (tanh form, as GPT-2 was trained) FFN with biases."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker_orcd.engine.kv_cache import KVCache, SeqSpan, kv_dtype, single_sequence
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels.activations import gelu
from worker_orcd.kernels.attention import cached_attention, plan_attention
from worker_orcd.kernels.embedding import absolute_position_embedding
from worker_orcd.kernels.norm import layer_norm
from worker_orcd.models.common import batch_inputs
from worker_orcd.models.hparams import HParams
from worker_orcd.models.weights import Weights, linear
from worker_orcd.quant import QuantTensor

ARCHITECTURES = ("gpt2",)


@dataclass(frozen=True)
class GPT2Config:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    context_length: int
    gelu_tanh: bool = True

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> GPT2Config:
        hp = HParams(f)
        dim = hp.int("embedding_length")
        n_heads = hp.int("attention.head_count")
        hp.require(dim % n_heads == 0, f"embedding_length {dim} not divisible by head_count {n_heads}")
        embd = f.tensors.get("token_embd.weight")
        pos = f.tensors.get("position_embd.weight")
        hp.require(embd is not None and pos is not None, "token_embd.weight and position_embd.weight are required")
        ctx = hp.int("context_length")
        hp.require(pos.shape[0] >= ctx, f"position_embd has {pos.shape[0]} rows < context_length {ctx}")
        return cls(
            architecture=hp.arch,
            vocab_size=embd.shape[0],
            dim=dim,
            n_layers=hp.int("block_count"),
            n_heads=n_heads,
            head_dim=dim // n_heads,
            ffn_dim=hp.int("feed_forward_length"),
            norm_eps=hp.float("attention.layer_norm_epsilon"),
            context_length=ctx,
        )


@dataclass
class GPT2Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    wqkv: QuantTensor
    bqkv: torch.Tensor
    wo: QuantTensor
    bo: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w_up: QuantTensor
    b_up: torch.Tensor
    w_down: QuantTensor
    b_down: torch.Tensor


class GPT2Model:
    def __init__(self, cfg: GPT2Config, w: Weights, max_len: int | None = None):
        self.cfg = cfg
        self.device = w.device
        D, F = cfg.dim, cfg.ffn_dim
        self.tok_embd = w.matrix("token_embd.weight", (cfg.vocab_size, D))
        pos = w["position_embd.weight"]  # learned rows, small: kept dense
        self.pos_embd = pos.dequantize() if isinstance(pos, QuantTensor) else pos
        self.ln_f_w, self.ln_f_b = w.vector("output_norm.weight"), w.vector("output_norm.bias")
        self.output = w.matrix("output.weight", (cfg.vocab_size, D)) if "output.weight" in w else self.tok_embd
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            self.layers.append(GPT2Layer(
                ln1_w=w.vector(p + "attn_norm.weight"), ln1_b=w.vector(p + "attn_norm.bias"),
                wqkv=w.matrix(p + "attn_qkv.weight", (3 * D, D)), bqkv=w.vector(p + "attn_qkv.bias"),
                wo=w.matrix(p + "attn_output.weight", (D, D)), bo=w.vector(p + "attn_output.bias"),
                ln2_w=w.vector(p + "ffn_norm.weight"), ln2_b=w.vector(p + "ffn_norm.bias"),
                w_up=w.matrix(p + "ffn_up.weight", (F, D)), b_up=w.vector(p + "ffn_up.bias"),
                w_down=w.matrix(p + "ffn_down.weight", (D, F)), b_down=w.vector(p + "ffn_down.bias"),
            ))
        self.scale = cfg.head_dim**-0.5

    def new_kv_cache(self, max_len: int, n_slots: int = 1, dtype: torch.dtype | None = None,
                     n_blocks: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, c.n_heads, c.head_dim, max_len, n_slots, dtype or kv_dtype(self.device),
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
        plan = plan_attention(positions, seqs or single_sequence(T), None, kv)
        tokens, positions, seqs = batch_inputs(tokens, positions, seqs, self.device)
        x = absolute_position_embedding(self.tok_embd.embedding(tokens), self.pos_embd, positions)
        for i, layer in enumerate(self.layers):
            h = layer_norm(x, layer.ln1_w, layer.ln1_b, c.norm_eps)
            q, k, v = linear(h, layer.wqkv, layer.bqkv).reshape(T, 3, c.n_heads, c.head_dim).unbind(1)
            out = cached_attention(q, k, v, kv, i, plan, self.scale)
            x = x + linear(out.reshape(T, -1), layer.wo, layer.bo)
            h = layer_norm(x, layer.ln2_w, layer.ln2_b, c.norm_eps)
            x = x + linear(gelu(linear(h, layer.w_up, layer.b_up), approximate=c.gelu_tanh), layer.w_down, layer.b_down)
        if logit_rows is not None:
            x = x[logit_rows]
        return linear(layer_norm(x, self.ln_f_w, self.ln_f_b, c.norm_eps), self.output, out_dtype=torch.float32).float()
