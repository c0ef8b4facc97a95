"""llama.cpp's CPU dot products for Q4_0 and Q4_1 weights, on the GGUF blocks as they are.

Each row of activations is quantized to 8 bits per block of 32 (one scale a block, float16-rounded, as
llama.cpp's Q8_0/Q8_1), each block's integer products are summed exactly and scaled, float32 across blocks:
llama.cpp's own arithmetic (ggml-cpu's vec_dot_q4_0_q8_0 and vec_dot_q4_1_q8_1), 2-2.8x faster than torch's
int4pack kernel on AVX2 (NOTES.md, issue 13). Not for 8-bit weights: the same kernel on SmolLM2's Q8_0 head ran
2.8x faster than the float16 GEMV but took top-1 agreement with transformers from 98.8% to 94.9% (8-bit
activations move the head's near-ties); the float16 GEMV keeps them.

The kernel is C (q8dot.c, beside this file), compiled at first use with this machine's C compiler (`CC`, else
`cc`; ~0.5 s) into the user cache: AVX2 intrinsics where ATen reports AVX2 or AVX-512, plain C (which compilers
vectorize) elsewhere, OpenMP threads where the compiler has them. No compiler, a failed build, no OpenMP with
more than one thread, or a failed probe: torch's kernels stay (int4pack, the dense GEMV), with one warning line.
WORKER_ORCD_CPU_Q8DOT=0 switches it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

ENV = "WORKER_ORCD_CPU_Q8DOT"
SOURCE = Path(__file__).with_name("q8dot.c")
KINDS = {T.Q4_0: 0, T.Q4_1: 1}  # the C kernel's codes
BLOCK_BYTES = {T.Q4_0: 18, T.Q4_1: 20}


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded here; the message says why, in one line."""


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def compile_flags() -> list[str]:
    """-O3, AVX2 (with FMA and F16C, which every AVX2 CPU has) where ATen runs its AVX2 or AVX-512 kernels."""
    flags = ["-O3", "-shared", "-fPIC"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "worker-orcd"


def build() -> Path:
    """The compiled kernel for this machine's flags, built once into the cache (with OpenMP if it compiles)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise BuildError("no C compiler (set CC or install cc)")
    source = SOURCE.read_bytes()
    errors = []
    for extra in (["-fopenmp"], []):
        flags = compile_flags() + extra
        key = hashlib.sha256(source + " ".join([cc, *flags]).encode()).hexdigest()[:16]
        out = _cache_dir() / f"q8dot-{key}.so"
        failed = out.with_suffix(".failed")  # a build that failed once (e.g. no OpenMP) is not tried again
        if out.exists():
            return out
        if failed.exists():
            errors.append(failed.read_text(errors="replace").strip())
            continue
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BuildError(f"cannot write the kernel's cache {out.parent}: {e}") from e
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            lib = Path(tmp) / out.name
            try:
                run = subprocess.run([cc, *flags, str(SOURCE), "-o", str(lib)], capture_output=True, text=True,
                                     timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise BuildError(f"the C compiler {cc} did not run: {e}") from e
            if run.returncode == 0:
                os.replace(lib, out)  # atomic: another process may build the same file
                return out
            errors.append(f"{' '.join([Path(cc).name, *flags])}: {(run.stderr.strip().splitlines() or ['?'])[0]}")
            failed.write_text(errors[-1])
    raise BuildError("the C compiler failed: " + " | ".join(errors))


def load(path: Path) -> ctypes.CDLL:
    """A compiled kernel, with its functions' argument types set."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"could not load the compiled kernel: {e}") from e
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.q8dot_quantize.argtypes = [p, i64, i64, p, p, p]
    lib.q8dot_quantize.restype = None
    lib.q8dot_matmul.argtypes = [ctypes.c_int, p, i64, i64, p, p, p, i64, p, ctypes.c_int]
    lib.q8dot_matmul.restype = None
    lib.q8dot_has_openmp.restype = ctypes.c_int
    return lib


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """This machine's kernel, built if needed and loaded once per process."""
    global _lib
    if _lib is None:
        _lib = load(build())
    return _lib


def threads_ok() -> bool:
    """Without OpenMP the kernel runs on one thread: only worth it where torch also runs one."""
    return bool(library().q8dot_has_openmp()) or torch.get_num_threads() == 1


class Q8DotLinear:
    """y = x @ W^T for a Q4_0/Q4_1 weight kept as its GGUF blocks (uint8 [N, K/32 * block bytes]);
    float32 in and out (other dtypes are converted), any number of rows, each computed on its own."""

    def __init__(self, raw: torch.Tensor, ggml_type: T, shape: tuple[int, int], lib: ctypes.CDLL | None = None):
        N, K = shape
        if (ggml_type not in KINDS or K % 32 or raw.dtype != torch.uint8
                or raw.numel() != N * K // 32 * BLOCK_BYTES[ggml_type]):
            raise ValueError(f"Q8DotLinear: {ggml_type.name} [{N}, {K}] from {raw.numel()} {raw.dtype} values")
        self.lib = lib or library()
        self.kind, self.out_features, self.in_features = KINDS[ggml_type], N, K
        self.blocks = raw.reshape(N, -1).contiguous()
        self.nbytes = self.blocks.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        M = x2.shape[0]
        q = torch.empty(M, K, dtype=torch.int8)
        d = torch.empty(M, K // 32)
        s = torch.empty(M, K // 32)
        y = torch.empty(M, N)
        self.lib.q8dot_quantize(x2.data_ptr(), M, K, q.data_ptr(), d.data_ptr(), s.data_ptr())
        self.lib.q8dot_matmul(self.kind, self.blocks.data_ptr(), N, K, q.data_ptr(), d.data_ptr(), s.data_ptr(), M,
                              y.data_ptr(), torch.get_num_threads())
        y = y if x.dtype == torch.float32 else y.to(x.dtype)
        return y.reshape(*x.shape[:-1], N)
