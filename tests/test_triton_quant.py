"""Triton Q8_0 / MXFP4 GEMV and GEMM against float64 references on fresh random blocks.

On CPU through TRITON_INTERPRET=1 at tiny shapes (conftest sets it); on the GPU at GPT-OSS-20B shapes.
"""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from worker_orcd.kernels.triton_quant import (
    GEMV_ROWS,
    dequantize_packed,
    gemm_config,
    gemv_config,
    pack_mxfp4,
    pack_q8_0,
    quant_matmul,
    split_k,
    unpack,
)
from worker_orcd.quant import QuantTensor, dequantize
from worker_orcd.quant.gpu_matmul import gpu_matmul, packed

PACK = {T.Q8_0: pack_q8_0, T.MXFP4: pack_mxfp4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "output has NaN/inf (unwritten or overflowed)"
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_blocks(kind: T, rows: int, k: int, device: str = "cpu") -> torch.Tensor:
    """uint8 [rows, row_bytes] of valid blocks with realistic scales (Q8_0 d ~ 1e-3..1e-2, MXFP4 e ~ 2^-11..2^1:
    inside the range that scale folding takes, packed.MXFP4_FOLD_E)."""
    nb = k // 32
    if kind == T.Q8_0:
        d = (torch.rand(rows, nb, 1, device=device) * 0.01 + 0.001).half().view(torch.uint8)
        q = torch.randint(0, 256, (rows, nb, 32), dtype=torch.uint8, device=device)
        return torch.cat([d.reshape(rows, nb, 2), q], -1).reshape(rows, -1)
    e = torch.randint(116, 129, (rows, nb, 1), dtype=torch.uint8, device=device)
    q = torch.randint(0, 256, (rows, nb, 16), dtype=torch.uint8, device=device)
    return torch.cat([e, q], -1).reshape(rows, -1)


def f16_exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 values: the float16 tiles (F16_TILES) then add no rounding of their own, so the
    bars below test the decode and the sums alone."""
    return x.half().to(x.dtype)


def reference_weights(raw: torch.Tensor, kind: T, p, cfg: dict | None, m: int) -> torch.Tensor:
    """The weights quant_matmul(p, x [m, K], cfg) multiplies by, in float64: folded Q8_0 scales (FOLD, the
    default where the weight allows) make them q * d rounded to float16; every other path is exact."""
    w = dequantize(raw, kind, (p.n, p.k))
    c = cfg or (gemm_config(p, m) if m > GEMV_ROWS else {})
    if kind == T.Q8_0 and c.get("F16") and c.get("FOLD") and p.fold:
        w = w.half()
    return w.double()


def check(kind: T, n: int, k: int, m: int, dtype: torch.dtype, tol: float, device: str = "cpu", cfg=None):
    raw = random_blocks(kind, n, k, device)
    x = f16_exact(torch.randn(m, k, device=device)).to(dtype)
    p = PACK[kind](raw, n, k)
    ref = x.double() @ reference_weights(raw, kind, p, cfg, m).to(device).T
    y = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    quant_matmul(p, x, cfg, out=y)
    assert rel_err(y, ref) < tol


# (n, k): ragged row tiles, K a whole number of steps and not, one block
SHAPES = [(20, 128), (7, 96), (33, 32)]


@pytest.mark.parametrize("kind", [T.Q8_0, T.MXFP4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_interpreted(kind, n, k):
    check(kind, n, k, 1, torch.float32, 1e-5)


@pytest.mark.parametrize("kind", [T.Q8_0, T.MXFP4])
def test_gemv_split_k_and_bf16(kind):
    cfg = {"BN": 8, "NB": 1, "STAGES": 1, "TARGET": 64, "num_warps": 1}  # 2 row tiles -> 4+ splits
    assert split_k(7, 2, 1, 64)[0] > 1
    check(kind, 12, 224, 1, torch.float32, 1e-5, cfg=cfg)
    check(kind, 12, 224, 3, torch.float32, 1e-5, cfg=cfg)  # a few rows of x: one GEMV program per row
    check(kind, 12, 224, 1, torch.bfloat16, 1e-2, cfg=cfg)


@pytest.mark.parametrize("kind", [T.Q8_0, T.MXFP4])
@pytest.mark.parametrize("m", [2, 19])
@pytest.mark.parametrize("tiles", [{"F16": True}, {"F16": True, "W_LEFT": True}, {"F16": False},
                                   {"F16": True, "FOLD": True}, {"F16": True, "W_LEFT": True, "FOLD": True},
                                   {"F16": True, "FOLD": True, "M_FIRST": True}])
def test_gemm_interpreted(kind, m, tiles):
    """float16 block tiles (weights as the dot's right operand, then as its left; scales after each block's dot,
    or folded into the weights), bfloat16 tiles; the grid with row tiles first (M_FIRST)."""
    check(kind, 20, 160, m, torch.float32, 1e-5, cfg=gemm_config(None, m) | tiles)  # dots in float32 here
    split = {"BM": 16, "BN": 16, "NB": 1, "TARGET": 8, "num_warps": 1, "num_stages": 1} | tiles  # 4 splits
    check(kind, 20, 160, m, torch.float32, 1e-5, cfg=split)


def test_fold_only_where_the_scales_fit():
    """MXFP4 exponents outside [104, 128] (or Q8_0 |d| > 512) would not survive folding into float16: such a
    weight is marked, and a config asking to fold takes the per-block scaling for it (same result)."""
    raw = random_blocks(T.MXFP4, 20, 160)
    assert PACK[T.MXFP4](raw, 20, 160).fold
    b = raw.reshape(20, 5, 17).clone()
    b[3, 2, 0] = 131  # 2^4: 6 * 2^4 fits float16, but the scale 2^(131-113) does not
    b[4, 1, 0] = 0  # a zero scale folds (to 0)
    p = PACK[T.MXFP4](b.reshape(20, -1), 20, 160)
    assert not p.fold and PACK[T.MXFP4](b[:3].reshape(3, -1), 3, 160).fold
    x = f16_exact(torch.randn(3, 160))
    ref = x.double() @ dequantize(b.reshape(20, -1), T.MXFP4, (20, 160)).double().T
    assert rel_err(quant_matmul(p, x, gemm_config(p, 3) | {"F16": True, "FOLD": True}), ref) < 1e-5
    q8 = random_blocks(T.Q8_0, 4, 64).reshape(4, 2, 34).clone()
    assert PACK[T.Q8_0](q8.reshape(4, -1), 4, 64).fold
    q8[1, 1, 0:2] = torch.tensor([600.0], dtype=torch.float16).view(torch.uint8)
    assert not PACK[T.Q8_0](q8.reshape(4, -1), 4, 64).fold


@pytest.mark.parametrize("kind", [T.Q8_0, T.MXFP4])
@pytest.mark.parametrize("cfg", [None, {"BM": 16, "BN": 16, "NB": 1, "TARGET": 8, "num_warps": 1,
                                       "num_stages": 1}])  # the default (one split); 4 splits
def test_bias_joins_the_sum(kind, cfg):
    """x @ W.T + b: inside the split-K sum (float32) when K is split, one add after otherwise."""
    raw = random_blocks(kind, 20, 160)
    p = PACK[kind](raw, 20, 160)
    x, b = f16_exact(torch.randn(3, 160)), torch.randn(20)
    ref = x.double() @ reference_weights(raw, kind, p, cfg, 3).T + b.double()
    y = torch.full((3, 20), float("nan"))
    quant_matmul(p, x, cfg, out=y, bias=b)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("kind", [T.Q8_0, T.MXFP4])
@pytest.mark.parametrize("cfg", [None, {"BM": 16, "BN": 16, "NB": 1, "TARGET": 8, "num_warps": 1, "num_stages": 1}])
def test_decode_rows_do_not_depend_on_the_batch(kind, cfg):
    """Split-K and tiles follow the weight's shape, never the row count: a row gives the same bits alone."""
    p = PACK[kind](random_blocks(kind, 20, 160), 20, 160)
    x = torch.randn(17, 160)
    many = quant_matmul(p, x, cfg)
    for r in (0, 16):
        assert torch.equal(quant_matmul(p, x[r : r + 1], cfg)[0], many[r])


@pytest.mark.parametrize("kind", [T.Q8_0, T.MXFP4])
def test_dequantize_packed_is_the_reference(kind):
    raw = random_blocks(kind, 9, 96)
    got = dequantize_packed(PACK[kind](raw, 9, 96), torch.float32)
    assert torch.equal(got, dequantize(raw, kind, (9, 96)).float())


def test_pack_keeps_bytes():
    """Repacked codes are the ggml blocks' size: 4 bits (MXFP4) or 8 bits (Q8_0) a weight, scales apart."""
    for kind, per_weight in [(T.Q8_0, 1.0), (T.MXFP4, 0.5)]:
        p = PACK[kind](random_blocks(kind, 6, 64), 6, 64)
        assert p.codes.numel() * 4 == 6 * 64 * per_weight
        assert p.nbytes == 6 * 64 // 32 * (34 if kind == T.Q8_0 else 17)


@pytest.mark.parametrize("kind", [T.Q8_0, T.MXFP4])
def test_unpack_returns_the_exact_blocks(kind):
    """Packing is lossless: the blocks come back bit for bit, whole, by row range and by gathered rows."""
    raw = random_blocks(kind, 37, 96)
    if kind == T.MXFP4:
        raw.reshape(37, 3, 17)[:5, :, 0] = torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8)[:, None]
    p = PACK[kind](raw, 37, 96)
    assert torch.equal(unpack(p), raw)
    assert torch.equal(unpack(p, chunk_rows=5), raw)
    assert torch.equal(unpack(p.rows(10, 20)), raw[10:20])
    ids = torch.tensor([3, 36, 3, 0])
    assert torch.equal(unpack(p.take(ids)), raw[ids])


def test_gpu_matmul_entry_caches_and_falls_back():
    w = QuantTensor(random_blocks(T.MXFP4, 10, 64), T.MXFP4, (10, 64))
    x = f16_exact(torch.randn(3, 2, 64))
    y = gpu_matmul(w, x)
    assert y.shape == (3, 2, 10) and packed(w) is packed(w)
    assert rel_err(y, x.double() @ w.dequantize(torch.float64).T) < 1e-5
    x64 = torch.randn(2, 64, dtype=torch.float64)  # float64 asks for reference precision: dequantize + matmul
    assert rel_err(gpu_matmul(w, x64), x64 @ w.dequantize(torch.float64).T) < 1e-12
    d = (torch.rand(4, 1) + 0.5).half().view(torch.uint8)  # finite scales; Q4_0 runs kernels/triton_kquant.py
    q4 = QuantTensor(torch.cat([d, torch.randint(0, 256, (4, 16), dtype=torch.uint8)], -1), T.Q4_0, (4, 32))
    assert packed(q4).kind == "q4_0"
    xq = f16_exact(torch.randn(2, 32))
    assert rel_err(gpu_matmul(q4, xq), xq.double() @ q4.dequantize(torch.float64).T) < 1e-5


def test_shape_mismatch_is_refused():
    p = pack_q8_0(random_blocks(T.Q8_0, 4, 64), 4, 64)
    with pytest.raises(ValueError, match="features"):
        quant_matmul(p, torch.randn(1, 32))


# GPT-OSS-20B: attention q, k/v, o and a dense MXFP4 matrix, decode and prefill
GPU_SHAPES = [(T.Q8_0, 4096, 2880), (T.Q8_0, 512, 2880), (T.Q8_0, 2880, 4096), (T.MXFP4, 2880, 2880)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 300])
def test_gpu_real_shapes(kind, n, k, m):
    check(kind, n, k, m, torch.float32, 1e-2, device="cuda")  # bf16 tensor-core operands (the GEMV: 1e-5)
    check(kind, n, k, m, torch.float32, 1e-5, device="cuda", cfg=gemv_config(PACK[kind](random_blocks(kind, n, k,
                                                                                                     "cuda"), n, k)))
    check(kind, n, k, m, torch.bfloat16, 1e-2, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind,n,k", GPU_SHAPES + [(T.Q8_0, 201088, 2880)])
def test_gpu_decode_rows_do_not_depend_on_the_batch(kind, n, k):
    """The default decode path on the device: a row alone gives the bits it gives among 64 others."""
    p = PACK[kind](random_blocks(kind, n, k, "cuda"), n, k)
    x = torch.randn(65, k, device="cuda").bfloat16()
    many = quant_matmul(p, x)
    for r in (0, 37, 64):
        assert torch.equal(quant_matmul(p, x[r : r + 1])[0], many[r])


@pytest.mark.gpu
def test_gpu_tile_width_changes_no_bits():
    """The splits of K follow SPLIT_BN: another tile width, warps or pipeline depth gives the same bits."""
    n, k = 5120, 2880
    p = pack_q8_0(random_blocks(T.Q8_0, n, k, "cuda"), n, k)
    x = torch.randn(16, k, device="cuda").half()
    base = gemm_config(p, 16)
    want = quant_matmul(p, x, base)
    for bn, warps, stages in [(64, 4, 2), (32, 2, 3)]:
        cfg = base | {"BN": bn, "num_warps": warps, "num_stages": stages, "SPLIT_BN": base["BN"]}
        assert torch.equal(quant_matmul(p, x, cfg), want), (bn, warps, stages)

@pytest.mark.parametrize("kind", [T.MXFP4, T.Q8_0])
def test_row_groups(kind, monkeypatch):
    """128 rows pack in groups of 64 (quant/packed.py; Q8_0 when switched on): every kernel reads them, and the
    rows come back exactly through unpack, row slices, gathers and concatenations (mixed groups fall back to
    row by row)."""
    from worker_orcd.quant import packed as packed_module
    from worker_orcd.quant.packed import MXFP4_GROUP, cat_rows

    monkeypatch.setattr(packed_module, "Q8_0_GROUP", MXFP4_GROUP)
    pack = PACK[kind]
    n, k = 2 * MXFP4_GROUP, 96
    raw = random_blocks(kind, n, k)
    p = pack(raw, n, k)
    assert p.group == MXFP4_GROUP > 1 and pack(raw[:20], 20, k).group == 1
    assert torch.equal(unpack(p), raw)
    ref_w = dequantize(raw, kind, (n, k)).double()
    assert torch.equal(dequantize_packed(p, torch.float32).double(), ref_w)
    x = f16_exact(torch.randn(3, k))
    cfgs = [gemv_config(p), {"BN": 16, "NB": 2, "STAGES": 1, "TARGET": 8, "num_warps": 1},
            gemm_config(p, 3) | {"F16": True}, gemm_config(p, 3) | {"F16": True, "W_LEFT": True},
            gemm_config(p, 3) | {"F16": True, "FOLD": True}, gemm_config(p, 3) | {"F16": False}]
    for cfg in cfgs:
        assert rel_err(quant_matmul(p, x, cfg), x.double() @ reference_weights(raw, kind, p, cfg, 3).T) < 1e-5, cfg
    half = p.rows(MXFP4_GROUP, n)
    assert half.group == MXFP4_GROUP and torch.equal(unpack(half), raw[MXFP4_GROUP:])
    assert torch.equal(unpack(p.rows(3, 40)), raw[3:40])  # not on a group boundary: a row-by-row copy
    ids = torch.tensor([127, 0, 65, 65])
    assert torch.equal(unpack(p.take(ids)), raw[ids])
    both = cat_rows([p, p.rows(0, MXFP4_GROUP)])
    assert both.group == MXFP4_GROUP and torch.equal(unpack(both), torch.cat([raw, raw[:MXFP4_GROUP]]))
    mixed = cat_rows([p, pack(raw[:20], 20, k)])
    assert mixed.group == 1 and torch.equal(unpack(mixed), torch.cat([raw, raw[:20]]))


def test_cublas_into_both_output_dtypes():
    """The prompt-chunk path's matmul (on CUDA through cuBLAS; any device runs it): into bf16 and float32 outputs."""
    from worker_orcd.kernels.triton_quant import cublas_into

    x, wd = f16_exact(torch.randn(5, 64)), torch.randn(7, 64).bfloat16()
    ref = x.bfloat16().double() @ wd.double().T
    for dtype in (torch.bfloat16, torch.float32):
        y = torch.full((5, 7), float("nan"), dtype=dtype)
        assert cublas_into(x, wd, y) is y and rel_err(y, ref) < 1e-2
