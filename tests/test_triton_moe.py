"""Triton MXFP4 MoE decode against its float64 torch reference, on fresh random experts and routes."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from tests.test_triton_quant import random_blocks, rel_err
from worker_orcd.kernels.activations import clamped_swiglu
from worker_orcd.kernels.triton_moe import (
    group_pairs,
    moe_grouped,
    moe_mxfp4,
    moe_reference,
    moe_tiles,
    route_tiles,
)
from worker_orcd.kernels.triton_quant import F16_TILES
from worker_orcd.quant import QuantTensor
from worker_orcd.quant.mxfp4 import quantize_mxfp4

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's sigmoid


def experts(E: int, F: int, D: int, device: str):
    def q(rows: int, cols: int) -> QuantTensor:
        return QuantTensor(random_blocks(T.MXFP4, E * rows, cols, device), T.MXFP4, (E, rows, cols))

    bias = [torch.randn(E, n, device=device) for n in (F, F, D)]
    return q(F, D), bias[0], q(F, D), bias[1], q(D, F), bias[2]


def routes(T_: int, E: int, k: int, device: str):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T_)]).to(device)
    return ids, torch.softmax(torch.randn(T_, k), -1).to(device)


def check(E, F, D, T_, k, dtype, tol, device="cpu", cfg=None):
    g, gb, u, ub, d, db = experts(E, F, D, device)
    x = (torch.randn(T_, D, device=device) * 0.5).to(dtype)
    ids, w = routes(T_, E, k, device)
    out = torch.full((T_, D), float("nan"), dtype=dtype, device=device)
    moe_mxfp4(x, ids, w, g, gb, u, ub, d, db, cfg=cfg, out=out)
    assert rel_err(out, moe_reference(x, ids, w, g, gb, u, ub, d, db)) < tol


@pytest.mark.parametrize("T_,k", [(1, 2), (3, 2)])
def test_moe_interpreted(T_, k):
    check(E=4, F=64, D=96, T_=T_, k=k, dtype=torch.float32, tol=1e-5)  # D: 3 blocks, steps of 2 -> masked tail


def test_moe_split_down_and_bf16():
    cfg = {"BN": 32, "NB": 1, "STAGES": 0, "TARGET": 64, "num_warps": 1}  # down over 3 splits of F
    check(E=3, F=96, D=64, T_=2, k=2, dtype=torch.float32, tol=1e-5, cfg=cfg)
    check(E=3, F=96, D=64, T_=1, k=3, dtype=torch.bfloat16, tol=1e-2, cfg=cfg)


def test_reference_is_the_model_math():
    """moe_reference == the per-expert formula written out in float64 from dequantized weights."""
    E, F, D = 3, 32, 64
    w = [torch.randn(E, F, D), torch.randn(E, F, D), torch.randn(E, D, F)]
    qt = [QuantTensor(quantize_mxfp4(t).reshape(-1, t.shape[-1] // 32 * 17), T.MXFP4, tuple(t.shape)) for t in w]
    dq = [t.dequantize(torch.float64) for t in qt]
    gb, ub, db = torch.randn(E, F), torch.randn(E, F), torch.randn(E, D)
    x = torch.randn(2, D)
    ids, wt = torch.tensor([[2, 0], [1, 2]]), torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    want = torch.zeros(2, D, dtype=torch.float64)
    for t in range(2):
        for j in range(2):
            e = int(ids[t, j])
            h = clamped_swiglu(dq[0][e] @ x[t].double() + gb[e], dq[1][e] @ x[t].double() + ub[e], 7.0, 1.702)
            want[t] += wt[t, j] * (dq[2][e] @ h + db[e])
    got = moe_reference(x, ids, wt, qt[0], gb, qt[1], ub, qt[2], db)
    assert rel_err(got, want) < 1e-12


def test_refuses_non_mxfp4_experts():
    g, gb, u, ub, d, db = experts(2, 32, 32, "cpu")
    q8 = QuantTensor(random_blocks(T.Q8_0, 64, 32), T.Q8_0, (2, 32, 32))
    with pytest.raises(ValueError, match="MXFP4"):
        moe_mxfp4(torch.randn(1, 32), torch.tensor([[0]]), torch.ones(1, 1), q8, gb, u, ub, d, db)


@pytest.mark.gpu
@pytest.mark.parametrize("T_", [1, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_moe_gpu_gpt_oss_20b(T_, dtype, tol):
    check(E=32, F=2880, D=2880, T_=T_, k=4, dtype=dtype, tol=tol, device="cuda")


def check_grouped(E, F, D, T_, k, tol, device="cpu"):
    g, gb, u, ub, d, db = experts(E, F, D, device)
    x = torch.randn(T_, D, device=device) * 0.5
    ids, w = routes(T_, E, k, device)
    got = moe_grouped(x, ids, w, g, gb, u, ub, d, db)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    tol = max(tol, 2e-3) if F16_TILES else tol  # the float16 tiles round x and h to float16
    assert rel_err(got, moe_reference(x, ids, w, g, gb, u, ub, d, db)) < tol
    return x, ids, w, (g, gb, u, ub, d, db), got


def test_group_pairs_tiles_hold_one_expert_each():
    ids = torch.tensor([[3, 1], [1, 0], [3, 1], [2, 1]])  # expert 1: 4 pairs, 3: 2, 0 and 2: 1
    pairs, tile_expert = group_pairs(ids, 5, group=2)
    flat = ids.reshape(-1)
    assert tile_expert.shape[0] == 4 + 5  # ceil(8 / 2) + min(5, 8)
    seen = []
    for t, e in enumerate(tile_expert.tolist()):
        tile = [p for p in pairs[2 * t : 2 * t + 2].tolist() if p >= 0]
        if e >= 5:
            assert tile == []
            continue
        assert tile and all(int(flat[p]) == e for p in tile)
        seen += tile
    assert sorted(seen) == list(range(8))


@pytest.mark.parametrize("T_,k", [(1, 2), (5, 2)])
def test_moe_grouped_interpreted(T_, k):
    check_grouped(E=4, F=64, D=96, T_=T_, k=k, tol=1e-5)  # D: 3 blocks, steps of 4 -> masked tail


def test_moe_grouped_rows_do_not_depend_on_the_batch():
    """A token's output is the same bits alone and among others (tiles are one expert, fixed shape)."""
    x, ids, w, ws, got = check_grouped(E=4, F=64, D=64, T_=6, k=2, tol=1e-5)
    for t in (0, 4):
        alone = moe_grouped(x[t : t + 1], ids[t : t + 1], w[t : t + 1], *ws)
        assert torch.equal(alone[0], got[t])


@pytest.mark.gpu
@pytest.mark.parametrize("T_", [1, 16, 200])
def test_moe_grouped_gpu_gpt_oss_20b(T_):
    x, ids, w, ws, got = check_grouped(E=32, F=2880, D=2880, T_=T_, k=4, tol=2e-2, device="cuda")
    if T_ <= 128:  # decode-sized batches: a token's result does not depend on the others (prompt chunks differ)
        alone = moe_grouped(x[:1], ids[:1], w[:1], *ws)
        assert torch.equal(alone[0], got[0])


@pytest.mark.parametrize("T_,E,k,group", [(1, 32, 4, 16), (5, 4, 2, 2), (3, 5, 2, 2), (40, 32, 4, 16)])
def test_route_tiles_kernel_is_group_pairs(T_, E, k, group):
    """The one-program routing kernel places every pair exactly where the torch version does."""
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T_)])
    want, got = group_pairs(ids, E, group), route_tiles(ids, E, group)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("f16,w_left,fold", [(True, False, False), (True, True, False), (False, False, False),
                                             (True, False, True), (True, True, True)])
def test_moe_tiles_with_gate_up_split(f16, w_left, fold):
    """gate/up split over D (partial sums added in order before the SwiGLU); a token alone gives the same bits
    as among others. Every tile decoder: float16 (scaled after the dot or folded into the weights; weights as
    its right or left operand) and bfloat16."""
    cfg = {"BM": 16, "BN": 16, "NB": 2 if fold else 1, "UP_TARGET": 64, "TARGET": 64, "num_warps": 1,
           "num_stages": 1, "F16": f16, "W_LEFT": w_left, "FOLD": fold}
    g, gb, u, ub, d, db = experts(5, 96, 128, "cpu")
    x = torch.randn(7, 128) * 0.5
    ids, w = routes(7, 5, 3, "cpu")
    out = torch.full((7, 128), float("nan"))
    moe_tiles(x, ids, w, g, gb, u, ub, d, db, cfg=cfg, out=out)
    tol = 2e-3 if f16 else 1e-5  # float16 x and h: 2^-11 rounding each (the interpreter dots in float32)
    assert rel_err(out, moe_reference(x, ids, w, g, gb, u, ub, d, db)) < tol
    assert torch.equal(moe_tiles(x[2:3], ids[2:3], w[2:3], g, gb, u, ub, d, db, cfg=cfg)[0], out[2])


def test_moe_tiles_partials_summed_in_the_norm_give_the_same_bits():
    """The expert tiles' k x splits partial rows a token (Partials), summed inside add_rms_norm, give the bits of
    the summed MoE added after it; Partials.dense() gives the summed MoE."""
    from worker_orcd.kernels.triton_norm import add_rms_norm_cuda
    from worker_orcd.kernels.triton_quant import Partials

    cfg = {"BM": 16, "BN": 16, "NB": 1, "UP_TARGET": 1, "TARGET": 64, "num_warps": 1, "num_stages": 1}
    g, gb, u, ub, d, db = experts(5, 192, 64, "cpu")
    x, res = torch.randn(4, 64) * 0.5, torch.randn(4, 64)
    ids, w = routes(4, 5, 3, "cpu")
    parts = moe_tiles(x, ids, w, g, gb, u, ub, d, db, cfg=cfg, partials=True)
    assert isinstance(parts, Partials) and parts.R == 3 * 3  # k experts x 3 splits of F
    y = moe_tiles(x, ids, w, g, gb, u, ub, d, db, cfg=cfg)
    assert torch.equal(parts.dense(), y)
    norm_w = torch.randn(64)
    fused, want = add_rms_norm_cuda(res, parts, norm_w, 1e-5, torch.float32), add_rms_norm_cuda(res, y, norm_w, 1e-5,
                                                                                               torch.float32)
    assert torch.equal(fused[0], want[0]) and torch.equal(fused[1], want[1])


def test_moe_prefill_grouped_mm_matches_reference():
    """The prompt-chunk path (experts dequantized, torch._grouped_mm over pairs sorted by expert)."""
    from worker_orcd.kernels.triton_moe import _packed, moe_prefill

    g, gb, u, ub, d, db = experts(4, 64, 96, "cpu")
    x = torch.randn(9, 96) * 0.5
    ids, w = routes(9, 4, 2, "cpu")
    got = moe_prefill(x, ids, w, _packed(g, "g"), gb, _packed(u, "u"), ub, _packed(d, "d"), db)
    assert rel_err(got, moe_reference(x, ids, w, g, gb, u, ub, d, db)) < 2e-2  # bf16 operands


@pytest.mark.gpu
def test_moe_tile_width_changes_no_bits():
    """The splits of K follow SPLIT_BN, so tiles of another width, warps or pipeline depth give the same bits
    (what lets tiles_config() pick its tile width for speed alone)."""
    from worker_orcd.kernels.triton_moe import tiles_config

    g, gb, u, ub, d, db = experts(32, 2880, 2880, "cuda")
    x = (torch.randn(16, 2880, device="cuda") * 0.5).half()
    ids, w = routes(16, 32, 4, "cuda")
    base = tiles_config()
    want = moe_tiles(x, ids, w, g, gb, u, ub, d, db, cfg=base)
    for bn, warps, stages in [(64, 8, 3), (16, 2, 4), (128, 4, 2)]:
        cfg = base | {"BN": bn, "num_warps": warps, "num_stages": stages, "SPLIT_BN": base.get("SPLIT_BN", base["BN"])}
        assert torch.equal(moe_tiles(x, ids, w, g, gb, u, ub, d, db, cfg=cfg), want), (bn, warps, stages)
