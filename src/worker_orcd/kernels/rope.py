"""Rotary position embeddings: frequencies (plain, per-dim factors, YaRN) and their application.

Two layouts, as llama.cpp names them: NORM rotates adjacent pairs (x[2i], x[2i+1]) — what GGUF
`llama` files need, since the converter permutes Q/K rows for it — and NEOX rotates the halves
(x[i], x[i + d/2]). Only the first `n_rot` dims of each head rotate (partial rotary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker_orcd.kernels.triton_quant import Partials


@dataclass(frozen=True)
class RopeConfig:
    n_rot: int  # rotated dims per head
    base: float
    neox: bool
    freq_factors: torch.Tensor | None = None  # per-pair divisors (llama3 rope_freqs, LongRoPE)
    attn_factor: float = 1.0  # scales cos and sin (LongRoPE / YaRN magnitude correction)
    yarn_factor: float = 1.0  # YaRN context extension factor (1 = off)
    yarn_orig_ctx: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0


def inv_freq(cfg: RopeConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """theta_i = base^(-2i/n_rot) for i < n_rot/2, with factors and YaRN interpolation applied. float64."""
    i = torch.arange(0, cfg.n_rot, 2, dtype=torch.float64, device=device)
    freq = cfg.base ** (-i / cfg.n_rot)
    if cfg.freq_factors is not None:
        freq = freq / cfg.freq_factors.to(device=device, dtype=torch.float64)
    if cfg.yarn_factor > 1.0:
        freq = _yarn(freq, cfg)
    return freq


def _yarn(freq: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """YaRN (NTK-by-parts): interpolate low frequencies by 1/factor, keep high ones; ramp between.

    The correction range is not rounded, as in OpenAI's gpt-oss reference and transformers
    (llama.cpp floors/ceils it).
    """
    d, base, orig = cfg.n_rot, cfg.base, cfg.yarn_orig_ctx

    def dim_for(rotations: float) -> float:
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(dim_for(cfg.yarn_beta_fast), 0.0)
    high = min(dim_for(cfg.yarn_beta_slow), d - 1.0)
    if low == high:
        high += 1e-3
    ramp = ((torch.arange(d // 2, dtype=torch.float64, device=freq.device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 where the dim keeps its original frequency
    return freq / cfg.yarn_factor * (1 - extrapolate) + freq * extrapolate


def yarn_attn_factor(factor: float) -> float:
    """YaRN's magnitude correction 0.1 ln(s) + 1, applied to cos and sin."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def cos_sin(cfg: RopeConfig, positions: torch.Tensor, freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, n_rot] in float32 for integer positions [T], laid out like the dims they rotate
    (halves for NEOX, adjacent pairs for NORM), so applying them is two multiplies and an add."""
    angles = positions.to(torch.float64)[:, None] * freq[None, :]
    cos, sin = (angles.cos() * cfg.attn_factor).float(), (angles.sin() * cfg.attn_factor).float()
    if cfg.neox:
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, neox: bool) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by cos/sin [T, n_rot] from cos_sin; dims past n_rot pass through.

    x*cos + rotate(x)*sin, where rotate maps each pair (a, b) to (-b, a). On CUDA one Triton launch
    (kernels/triton_rope.py), in x's dtype.
    """
    if x.is_cuda:
        from worker_orcd.kernels.triton_rope import apply_rope_cuda

        return apply_rope_cuda(x, cos, sin, n_rot, neox)
    rot = x[..., :n_rot] if n_rot < x.shape[-1] else x
    cos_h, sin_h = _per_head(cos, sin, neox)
    if neox:
        half = n_rot // 2
        turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    else:  # pairs (a, b) -> (b, a); sin_h carries the sign: (-sin, sin)
        turned = rot.unflatten(-1, (n_rot // 2, 2)).flip(-1).flatten(-2)
    out = rot * cos_h + turned * sin_h
    return torch.cat([out, x[..., n_rot:]], dim=-1) if n_rot < x.shape[-1] else out


def _per_head(cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, n_rot] to broadcast over heads (NORM: sin as (-sin, sin) per pair), made once per forward
    and kept on the cos tensor: every layer rotates by the same angles, and on CPU each op costs microseconds."""
    memo = getattr(cos, "_per_head", None)
    if memo is None or memo[0] is not sin or memo[1] != neox:
        sin_h = sin[:, None, :]
        if not neox:  # sin is repeated per pair (s, s): the first of each pair takes the minus of (-b, a)
            sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device).repeat(sin.shape[-1] // 2)
            sin_h = sin_h * sign
        memo = cos._per_head = (sin, neox, cos[:, None, :], sin_h)
    return memo[2], memo[3]


def rotate_qkv(qkv: torch.Tensor | Partials, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, neox: bool, n_heads: int,
               kv=None, layer: int = 0, plan=None, head_dim: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q [T, H, hd], k and v [T, Hkv, hd] from q|k|v heads side by side [T, H + 2 Hkv, hd], q and k rotated. On
    CUDA, when the step attends through the paged kernel (plan.tiles), k and v go straight into the layer's KV
    blocks in the same launch and come back as None (cached_attention then has nothing left to store). qkv may
    be a matmul's split-K Partials (CUDA, models/weights.linear(..., partials=True); head_dim then says its
    heads): that launch sums them, elsewhere they are summed first."""
    summed = isinstance(qkv, torch.Tensor)
    if (qkv.is_cuda if summed else qkv.part.is_cuda) and plan is not None and plan.tiles is not None:
        from worker_orcd.kernels.triton_rope import rope_qkv_store

        q = rope_qkv_store(qkv, cos, sin, n_rot, neox, n_heads, kv.k[layer], kv.v[layer], plan.blocks, plan.offsets)
        return q, None, None
    if not summed:
        qkv = qkv.dense().reshape(qkv.rows, -1, head_dim)
    n_kv = (qkv.shape[1] - n_heads) // 2
    qk = apply_rope(qkv[:, : n_heads + n_kv], cos, sin, n_rot, neox)
    return qk[:, :n_heads], qk[:, n_heads:], qkv[:, n_heads + n_kv :]
