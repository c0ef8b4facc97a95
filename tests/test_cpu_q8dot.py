"""llama.cpp's integer dot products on CPU (quant/cpu_q8dot.py): against float64 on the exact weights, against a
float64 model of its own arithmetic (activations quantized as llama.cpp does), rows apart from their batch,
the plain-C build beside the AVX2 one, and the fallbacks."""

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from worker_orcd.quant import cpu_caps, cpu_q8dot
from worker_orcd.quant.cpu_q8dot import Q8DotLinear

KINDS = [T.Q4_0, T.Q4_1]


def _kernel_builds() -> str:
    try:
        cpu_q8dot.library()
    except cpu_q8dot.BuildError as e:
        return str(e)
    return ""


# the kernel's own tests need a C compiler; without one the fallback tests below still run
needs_kernel = pytest.mark.skipif(bool(_kernel_builds()), reason=f"q8dot not built here: {_kernel_builds()}")


def weight(kind: T, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGUF blocks uint8 [n, row bytes], the exact weights float64 [n, k]) of a random matrix."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    raw = np.ascontiguousarray(quants.quantize(w, kind))
    return torch.from_numpy(raw).reshape(n, -1), torch.from_numpy(quants.dequantize(raw, kind).reshape(n, k)).double()


def blocks_of(raw: torch.Tensor, kind: T, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block: the scale, the offset (Q4_1's m, else 0) and the signed codes [n, k/32, 32]."""
    b = raw.numpy().reshape(raw.shape[0], k // 32, -1)
    scale = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    qs = b[..., 4:20] if kind == T.Q4_1 else b[..., 2:18]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int64)
    if kind == T.Q4_1:
        return scale, b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64), codes
    return scale, np.zeros_like(scale), codes - 8


def model_of_the_kernel(raw: torch.Tensor, kind: T, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized per block of 32 as llama.cpp's quantize_row_q8_0/q8_1
    (d = amax / 127 kept as float16, q = x / d rounded to nearest even, s = d * sum(q) as float16), then
    sum over blocks of d_w * d * (codes . q) (+ m_w * s for Q4_1)."""
    M, K = x.shape
    xb = x.reshape(M, K // 32, 32)
    d = xb.abs().amax(-1) / 127.0
    q = torch.round(xb * torch.where(d != 0, 1.0 / d, torch.zeros_like(d))[..., None])
    d16, s16 = d.half().double().numpy(), (d * q.sum(-1)).half().double().numpy()
    scale, offset, codes = blocks_of(raw, kind, K)
    dots = np.einsum("nbj,mbj->mnb", codes, q.numpy().astype(np.int64)).astype(np.float64)
    y = (scale[None] * d16[:, None] * dots).sum(-1) + (offset[None] * s16[:, None]).sum(-1)
    return torch.from_numpy(y)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", [(1, 64), (5, 576), (16, 1536)])
def test_matches_its_float64_model_and_the_exact_weights(kind, m, k):
    raw, w = weight(kind, 96, k, seed=m + k + int(kind))
    x = torch.randn(m, k) * 3
    y = Q8DotLinear(raw, kind, (96, k))(x)
    assert y.dtype == torch.float32 and y.shape == (m, 96) and torch.isfinite(y).all() and (y != 0).all()
    assert rel_err(y, model_of_the_kernel(raw, kind, x)) < 1e-6  # float32 sums of exact integer products
    assert rel_err(y, x.double() @ w.T) < 1.2e-2  # 8-bit activations: llama.cpp's own error


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_a_row_alone_gives_the_bits_it_gets_in_any_batch(kind):
    raw, _ = weight(kind, 200, 512, seed=3)
    lin = Q8DotLinear(raw, kind, (200, 512))
    x = torch.randn(16, 512)
    together = lin(x)
    assert torch.equal(torch.cat([lin(x[i : i + 1]) for i in range(16)]), together)
    xb = x[3:9].to(torch.bfloat16)  # another dtype: multiplied in float32, the result in that dtype
    assert torch.equal(lin(xb), lin(xb.float()).to(torch.bfloat16))


@needs_kernel
def test_plain_c_build_agrees_with_the_avx2_build(tmp_path, monkeypatch):
    """The build every non-x86 CPU gets (no intrinsics, compiler-vectorized C) computes the same sums."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_q8dot, "compile_flags", lambda: ["-O3", "-shared", "-fPIC"])
    plain = cpu_q8dot.load(cpu_q8dot.build())
    for kind in KINDS:
        raw, _ = weight(kind, 64, 576, seed=int(kind))
        x = torch.randn(3, 576)
        assert rel_err(Q8DotLinear(raw, kind, (64, 576), lib=plain)(x), Q8DotLinear(raw, kind, (64, 576))(x)) < 1e-6


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_activation_poisons_its_row_only(bad):
    raw, _ = weight(T.Q4_1, 40, 128, seed=5)
    x = torch.randn(3, 128)
    x[1, 70] = bad
    y = Q8DotLinear(raw, T.Q4_1, (40, 128))(x)
    assert not torch.isfinite(y[1]).any() and torch.isfinite(y[[0, 2]]).all()


@needs_kernel
def test_a_compiler_without_openmp_builds_plain_once(tmp_path, monkeypatch):
    """A compiler that refuses -fopenmp (Apple's clang): the build without it, and later builds neither retry the
    failed one nor compile again."""
    import shutil

    log = tmp_path / "calls"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *-fopenmp*) echo "no openmp" >&2; exit 1;; esac\n'
                  f'exec {shutil.which("cc") or shutil.which("gcc")} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lib = cpu_q8dot.load(cpu_q8dot.build())
    assert not lib.q8dot_has_openmp() and len(log.read_text().splitlines()) == 2
    cpu_q8dot.build()
    assert len(log.read_text().splitlines()) == 2


@needs_kernel
def test_wrong_sizes_are_refused():
    raw, _ = weight(T.Q4_1, 8, 64, seed=0)
    with pytest.raises(ValueError, match="Q4_1"):
        Q8DotLinear(raw, T.Q4_1, (8, 96))


@pytest.fixture
def restore_path():
    yield
    cpu_caps._chosen = None


def test_switch_off_keeps_int4pack(restore_path, monkeypatch):
    from worker_orcd.quant.cpu_matmul import Int4Linear, pack_for_cpu

    monkeypatch.setenv(cpu_q8dot.ENV, "0")
    cpu_caps._chosen = None
    assert not cpu_caps.cpu_kernels().q8dot
    raw, w = weight(T.Q4_1, 32, 64, seed=1)
    lin = pack_for_cpu(raw, T.Q4_1, (32, 64))
    x = torch.randn(3, 64)
    assert isinstance(lin, Int4Linear) and rel_err(lin(x), x.double() @ w.T) < 6e-3


def test_no_compiler_is_one_warning_and_torch_kernels(restore_path, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_q8dot, "_lib", None)
    cpu_caps._chosen = None
    with caplog.at_level(logging.WARNING, logger="worker_orcd.cpu"):
        assert not cpu_caps.cpu_kernels().q8dot
    lines = [r.getMessage() for r in caplog.records if "q8dot" in r.getMessage()]
    assert len(lines) == 1 and "no-such-cc" in lines[0] and "int4pack" in lines[0]
