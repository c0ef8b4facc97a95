"""quant/: every block format bit-exact against gguf.quants, and QuantTensor's API."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import quants as ref_quants

import worker_orcd.quant.tensor as quant_tensor
from worker_orcd.quant import SUPPORTED_TYPES, GGMLType, QuantTensor, dequantize

T = GGMLType
TYPES = sorted(SUPPORTED_TYPES)
# byte offsets of the little-endian f16 scale fields in one block
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def random_blocks(rng: np.random.Generator, gtype: GGMLType, n_blocks: int, scales: str) -> np.ndarray:
    """n_blocks of fresh random bytes [n_blocks, type_size]; f16 scales per `scales`.

    "any": left as random bytes (NaN and inf included); "finite": any finite f16;
    "moderate": magnitudes in [1e-3, 0.1], with MXFP4 exponents near 1 and float data N(0, 1), for matmuls.
    """
    _, size = GGML_QUANT_SIZES[gtype]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if scales == "any":
        return raw
    if scales == "finite":
        values = rng.integers(0, 1 << 16, (n_blocks, 2), dtype=np.uint16)
        values[(values & 0x7C00) == 0x7C00] &= 0xBFFF  # clear one exponent bit: no inf, no NaN
        values = values.view(np.float16)
    else:
        sign = rng.choice([-1, 1], (n_blocks, 2))
        values = (rng.uniform(1e-3, 0.1, (n_blocks, 2)) * sign).astype(np.float16)
    for i, at in enumerate(F16_FIELDS.get(gtype, [])):
        raw[:, at : at + 2] = values[:, i : i + 1].view(np.uint8)
    if gtype in (T.F16, T.BF16) and scales == "finite":
        exponent = 0x7C00 if gtype == T.F16 else 0x7F80
        bits = raw.view(np.uint16)
        bits[(bits & exponent) == exponent] &= 0xBFFF
    elif gtype in (T.F32, T.F16, T.BF16):
        floats = rng.standard_normal(n_blocks).astype(np.float32)
        raw = ref_quants.quantize(floats, gtype).view(np.uint8).reshape(n_blocks, size)
    if gtype == T.MXFP4 and scales == "moderate":
        raw[:, 0] = rng.integers(120, 132, n_blocks)
    return raw


def reference(raw: np.ndarray, gtype: GGMLType) -> torch.Tensor:
    with np.errstate(all="ignore"):
        return torch.from_numpy(np.ascontiguousarray(ref_quants.dequantize(raw, gtype), dtype=np.float32))


def ours(raw: np.ndarray, gtype: GGMLType) -> torch.Tensor:
    block, size = GGML_QUANT_SIZES[gtype]
    shape = (*raw.shape[:-1], raw.shape[-1] // size * block)
    return dequantize(torch.from_numpy(raw.copy()), gtype, shape)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def assert_bits_equal_nan_aware(got: torch.Tensor, want: torch.Tensor) -> None:
    """NaN where the reference has NaN (payloads differ by SIMD path), the same bits everywhere else."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def test_supported_types():
    assert SUPPORTED_TYPES == {
        T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4,
    }  # fmt: skip
    assert T.MXFP4 == 39


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gtype", TYPES, ids=lambda t: t.name)
def test_bit_exact_finite_scales(gtype, seed):
    rng = np.random.default_rng([seed, int(gtype)])
    raw = random_blocks(rng, gtype, 3 * 64, "finite").reshape(3, -1)  # 3 rows of 64 blocks
    assert_bits_equal(ours(raw, gtype), reference(raw, gtype))


@pytest.mark.parametrize("gtype", TYPES, ids=lambda t: t.name)
def test_bit_exact_any_bytes(gtype):
    rng = np.random.default_rng([7, int(gtype)])
    raw = random_blocks(rng, gtype, 4096, "any")
    assert_bits_equal_nan_aware(ours(raw, gtype), reference(raw, gtype))


@pytest.mark.parametrize("gtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_every_16_bit_pattern(gtype):
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    # NaN payloads included: ggml keeps them, so signaling NaNs must not be quieted
    assert_bits_equal(ours(raw, gtype), reference(raw, gtype))


def test_mxfp4_every_scale_and_code():
    e = np.repeat(np.arange(256, dtype=np.uint8), 2)  # two blocks per exponent: all 16 codes x 2 halves
    codes = np.tile(np.arange(16, dtype=np.uint8), (512, 2))  # [512, 32]
    codes[1::2] = codes[1::2, ::-1]
    qs = codes[:, :16] | (codes[:, 16:] << 4)
    raw = np.concatenate([e[:, None], qs], axis=1)
    got = ours(raw, T.MXFP4)
    assert_bits_equal(got, reference(raw, T.MXFP4))
    # against the spec itself for e = 0..252, where 6 * 2^(e-127) still fits in float32
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    e2m1 = torch.cat([e2m1, -e2m1])[torch.from_numpy(codes.astype(np.int64))]
    spec = e2m1 * torch.exp2(torch.from_numpy(e.astype(np.float64)) - 127)[:, None]
    assert torch.equal(got[: 2 * 253].double(), spec[: 2 * 253])
    assert got[2 * 253 :].isinf().any() and not got.isnan().any()


def test_layout_by_hand():
    # Q4_0: element j is the low nibble of byte j, element j+16 the high nibble; x = d * (q - 8)
    d = np.float16(0.5).tobytes()
    block = np.frombuffer(d + bytes([0x1F] + [0x88] * 15), np.uint8)
    x = ours(block, T.Q4_0)
    assert x[0] == 0.5 * (15 - 8) and x[16] == 0.5 * (1 - 8) and x[1] == 0 and x[17] == 0
    # Q5_0: bit j of the little-endian u32 qh is the fifth bit of element j
    block = np.frombuffer(d + (1 << 17).to_bytes(4, "little") + bytes(16), np.uint8)
    x = ours(block, T.Q5_0)
    assert x[17] == 0.5 * (16 - 16) and x[16] == 0.5 * (0 - 16)


@pytest.mark.parametrize("gtype", TYPES, ids=lambda t: t.name)
def test_any_raw_shape_and_device(gtype):
    rng = np.random.default_rng(int(gtype))
    raw = torch.from_numpy(random_blocks(rng, gtype, 12, "finite"))
    block, _ = GGML_QUANT_SIZES[gtype]
    flat = dequantize(raw.reshape(-1), gtype, (12 * block,))
    assert torch.equal(dequantize(raw.reshape(3, -1), gtype, (2, 6 * block)).reshape(-1), flat)
    assert torch.equal(dequantize(raw.reshape(2, 2, -1), gtype, (3, 2, 2 * block)).reshape(-1), flat)
    assert flat.device == raw.device


def test_dequantize_errors():
    raw = torch.zeros(36, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 34 bytes, got 36"):
        dequantize(raw, T.Q8_0, (32,))
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        dequantize(raw, T.Q8_0, (2, 18))
    with pytest.raises(ValueError, match="Q2_K is not supported"):
        dequantize(raw, T.Q2_K, (256,))
    with pytest.raises(ValueError, match="must be uint8"):
        dequantize(raw.to(torch.int8), T.F32, (9,))


# QuantTensor


def quant_weight(gtype: GGMLType, rows: int, cols: int, seed: int = 0) -> tuple[QuantTensor, torch.Tensor]:
    """A (rows, cols) weight from random bytes with moderate scales, and its float64 reference."""
    block, _ = GGML_QUANT_SIZES[gtype]
    rng = np.random.default_rng([seed, int(gtype)])
    raw = random_blocks(rng, gtype, rows * cols // block, "moderate").reshape(rows, -1)
    want = reference(raw, gtype).reshape(rows, cols).double()
    return QuantTensor.from_bytes(raw, gtype, (rows, cols)), want


def cols_for(gtype: GGMLType) -> int:
    return 2 * GGML_QUANT_SIZES[gtype][0] if GGML_QUANT_SIZES[gtype][0] > 1 else 96


@pytest.mark.parametrize("gtype", TYPES, ids=lambda t: t.name)
def test_quant_tensor_layout(gtype):
    w, ref = quant_weight(gtype, 3, cols_for(gtype))
    _, size = GGML_QUANT_SIZES[gtype]
    per_row = cols_for(gtype) // GGML_QUANT_SIZES[gtype][0] * size
    assert w.raw.dtype == torch.uint8 and tuple(w.raw.shape) == (3, per_row)
    assert w.nbytes == 3 * per_row and w.shape == (3, cols_for(gtype)) and w.ggml_type == gtype
    assert torch.equal(w.dequantize().double(), ref)
    assert w.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(w.to("cpu").dequantize(), w.dequantize())


@pytest.fixture
def reference_matmul(monkeypatch):
    """QuantTensor.matmul on its reference path: no device kernels registered."""
    for device in list(quant_tensor.MATMUL_KERNELS):
        monkeypatch.delitem(quant_tensor.MATMUL_KERNELS, device)


@pytest.mark.parametrize("gtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("x_shape", [(1,), (5,), (2, 3)], ids=str)
def test_matmul_matches_float64(gtype, x_shape, reference_matmul):
    cols = cols_for(gtype)
    w, ref = quant_weight(gtype, 3, cols)  # 3 rows: an odd output size
    x = torch.randn(*x_shape, cols, generator=torch.Generator().manual_seed(1))
    y = w.matmul(x)
    want = x.double() @ ref.T
    assert y.dtype == torch.float32 and y.shape == (*x_shape, 3)
    assert float((y.double() - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("gtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [3, 16, 40])
def test_matmul_registered_cpu_kernel(gtype, rows):
    """Whatever kernel is registered for CPU (packed bf16 ones included): any row count, close to float64 (within
    what 8-bit activations give on 4 blocks of K: llama.cpp's dot products, quant/cpu_q8dot.py, measured 1.1e-2)."""
    cols = 512 if gtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 128
    w, ref = quant_weight(gtype, rows, cols)
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(2))
    y = w.matmul(x)
    want = x.double() @ ref.T
    assert y.dtype == torch.float32 and y.shape == (2, rows)
    assert float((y.double() - want).norm() / want.norm()) < 2e-2


def test_matmul_keeps_input_dtype(reference_matmul):
    w, ref = quant_weight(T.Q4_K, 16, 512)
    x = torch.randn(4, 512)
    y = w.matmul(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    want = x.to(torch.bfloat16).double() @ ref.T
    assert float((y.double() - want).norm() / want.norm()) < 2e-2


def test_matmul_errors():
    w, _ = quant_weight(T.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="x has 32 features, weight \\(4, 64\\) has 64"):
        w.matmul(torch.zeros(2, 32))
    v = QuantTensor.from_bytes(np.zeros(34, np.uint8), T.Q8_0, (32,))
    with pytest.raises(ValueError, match="needs a 2-D tensor"):
        v.matmul(torch.zeros(32))


def test_matmul_dispatches_on_device(monkeypatch):
    w, _ = quant_weight(T.Q4_0, 4, 64)
    monkeypatch.setitem(quant_tensor.MATMUL_KERNELS, "cpu", lambda qt, x: torch.full((1,), 7.0))
    assert w.matmul(torch.zeros(64)).item() == 7.0


@pytest.mark.parametrize("gtype", TYPES, ids=lambda t: t.name)
def test_embedding_rows(gtype):
    w, _ = quant_weight(gtype, 7, cols_for(gtype))
    ids = torch.tensor([[6, 0, 3], [3, 3, 1]])
    got = w.embedding(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 3, cols_for(gtype))
    assert torch.equal(got, w.dequantize()[ids])
    assert torch.equal(w.embedding(torch.tensor(2)), w.dequantize()[2])


def test_embedding_expands_only_selected_rows(monkeypatch):
    w, _ = quant_weight(T.Q6_K, 64, 256)
    seen = []

    def counting(raw, gtype, shape):
        seen.append(raw.numel())
        return dequantize(raw, gtype, shape)

    monkeypatch.setattr(quant_tensor, "dequantize", counting)
    w.embedding(torch.tensor([5, 9]))
    assert seen == [2 * 210]


def test_embedding_errors():
    w, _ = quant_weight(T.Q8_0, 4, 32)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 4\)"):
        w.embedding(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="must be integers"):
        w.embedding(torch.tensor([0.0]))


def test_from_bytes_copies_read_only_files(recwarn):
    raw = np.zeros(2 * 34, np.uint8)
    raw.flags.writeable = False  # like a file's mmap
    t = QuantTensor.from_bytes(raw, T.Q8_0, (2, 32))
    assert not np.shares_memory(t.raw.numpy(), raw) and not recwarn.list


def test_from_bytes_shapes_and_errors():
    raw = np.zeros(2 * 3 * 34, np.uint8)
    t = QuantTensor.from_bytes(raw, T.Q8_0, (2, 3, 32))  # stacked experts: rows are the leading dims
    assert tuple(t.raw.shape) == (6, 34) and t.dequantize().shape == (2, 3, 32)
    assert QuantTensor.from_bytes(torch.from_numpy(raw), T.Q8_0, (6, 32)).shape == (6, 32)
    with pytest.raises(ValueError, match="needs 170 bytes, got 204"):
        QuantTensor.from_bytes(raw, T.Q8_0, (5, 32))
    with pytest.raises(ValueError, match="row length 48 .* block size 32"):
        QuantTensor.from_bytes(raw, T.Q8_0, (4, 48))
    with pytest.raises(ValueError, match="Q3_K is not supported"):
        QuantTensor.from_bytes(raw, T.Q3_K, (1, 256))
    with pytest.raises(ValueError, match="must be uint8"):
        QuantTensor.from_bytes(raw.view(np.int8), T.Q8_0, (6, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("gtype", TYPES, ids=lambda t: t.name)
def test_cuda_matches_cpu(gtype):
    rng = np.random.default_rng(int(gtype))
    raw = random_blocks(rng, gtype, 4096, "finite").reshape(16, -1)
    block, _ = GGML_QUANT_SIZES[gtype]
    shape = (16, 256 * block)
    cpu = QuantTensor.from_bytes(raw, gtype, shape)
    cuda = cpu.to("cuda")
    assert cuda.raw.is_cuda
    assert_bits_equal(cuda.dequantize().cpu(), cpu.dequantize())
    ids = torch.tensor([3, 15, 0], device="cuda")
    assert_bits_equal(cuda.embedding(ids).cpu(), cpu.embedding(ids.cpu()))
    assert cuda.embedding(ids.cpu()).is_cuda  # CPU ids are range-checked, then moved
    mapped = raw.copy()
    mapped.flags.writeable = False  # like a file's mmap
    direct = QuantTensor.from_bytes(mapped, gtype, shape, device="cuda")
    assert_bits_equal(direct.dequantize().cpu(), cpu.dequantize())
    w, ref = quant_weight(gtype, 64, cols_for(gtype))
    x = torch.randn(5, cols_for(gtype), dtype=torch.float64)
    y = w.to("cuda").matmul(x.cuda()).cpu()
    want = x @ ref.T
    assert float((y - want).norm() / want.norm()) < 1e-12
