"""CUDA C kernels of this package (mma_decode.cu) compiled at run time by NVRTC and launched through the driver
API (ctypes): NVRTC ships with PyTorch's CUDA wheels (libnvrtc), so no CUDA toolkit is needed. Launches go on
the current torch stream, with kernels/pdl.py's early launch while a CUDA graph is captured.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import sys
from pathlib import Path

import torch

from worker_orcd.kernels.pdl import pdl_launch

SOURCE = Path(__file__).with_name("mma_decode.cu")
log = logging.getLogger(__name__)


def _load_nvrtc() -> ctypes.CDLL:
    names = [f"libnvrtc.so.{v}" for v in (13, 12)] + ["libnvrtc.so"]
    if sys.platform == "win32":
        names = [f"nvrtc64_{v}0_0.dll" for v in (130, 120)]
    site = Path(torch.__file__).resolve().parent.parent
    names += sorted(glob.glob(str(site / "nvidia" / "**" / "libnvrtc.so*"), recursive=True))
    names += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no NVRTC library (libnvrtc) found")


def _check_nvrtc(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(rc).decode()}")


def compile_cubin(source: str, names: list[str], arch: str) -> tuple[bytes, dict[str, str]]:
    """NVRTC: `source` -> (cubin for `arch`, e.g. "sm_90", {name expression: lowered symbol})."""
    lib = _load_nvrtc()
    prog = ctypes.c_void_p()
    _check_nvrtc(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"mma_decode.cu", 0, None, None),
                 "create")  # fmt: skip
    try:
        for n in names:
            _check_nvrtc(lib, lib.nvrtcAddNameExpression(prog, n.encode()), "name " + n)
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--fmad=true"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            raise RuntimeError(f"NVRTC could not compile mma_decode.cu:\n{buf.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = {}
        for n in names:
            sym = ctypes.c_char_p()
            _check_nvrtc(lib, lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(sym)), "lowered name " + n)
            lowered[n] = sym.value.decode()
        return cubin.raw, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, pad to 8, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("smem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttr)),
        ("n_attrs", ctypes.c_uint),
    ]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_cuda: ctypes.CDLL | None = None


def _driver() -> ctypes.CDLL:
    global _cuda
    if _cuda is None:
        _cuda = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    return _cuda


def _check_cu(rc: int, what: str) -> None:
    if rc != 0:
        s = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(s))
        raise RuntimeError(f"CUDA driver {what}: {s.value.decode() if s.value else rc}")


class Kernel:
    """One kernel of a loaded module, launched on the current torch stream (with the early launch of
    kernels/pdl.py while a graph is captured)."""

    def __init__(self, module: ctypes.c_void_p, symbol: str):
        self.func = ctypes.c_void_p()
        _check_cu(_driver().cuModuleGetFunction(ctypes.byref(self.func), module, symbol.encode()), symbol)
        self.symbol = symbol

    def __call__(self, grid: tuple[int, int, int], threads: int, *args) -> None:
        """Tensors go as their data pointers (None: a null pointer), floats as float, ints as int."""
        vals = []
        for a in args:
            if isinstance(a, torch.Tensor) or a is None:
                vals.append(ctypes.c_void_p(None if a is None else a.data_ptr()))
            elif isinstance(a, float):
                vals.append(ctypes.c_float(a))
            else:
                vals.append(ctypes.c_int(int(a)))
        params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        attr = _LaunchAttr(id=PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1
        early = bool(pdl_launch())
        cfg = _LaunchConfig(
            grid=(ctypes.c_uint * 3)(*grid),
            block=(ctypes.c_uint * 3)(threads, 1, 1),
            smem=0,
            stream=ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
            attrs=ctypes.pointer(attr) if early else None,
            n_attrs=1 if early else 0,
        )
        _check_cu(_driver().cuLaunchKernelEx(ctypes.byref(cfg), self.func, params, None), self.symbol)


_modules: dict[tuple, dict[str, Kernel]] = {}


def load(device: torch.device, names: list[str]) -> dict[str, Kernel]:
    """{name expression: Kernel}: SOURCE's kernels `names` (template instances, e.g. "q8_gemm<1, 4, 3, 1, 1,
    false, 2>"), compiled for the device's architecture and loaded once per device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = (idx, tuple(sorted(names)))
    if key not in _modules:
        major, minor = torch.cuda.get_device_capability(idx)
        cubin, lowered = compile_cubin(SOURCE.read_text(), sorted(names), f"sm_{major}{minor}")
        with torch.cuda.device(idx):
            torch.cuda.current_stream()  # the primary context is current on this thread
            module = ctypes.c_void_p()
            _check_cu(_driver().cuModuleLoadData(ctypes.byref(module), cubin), "module load")
            _modules[key] = {n: Kernel(module, lowered[n]) for n in names}
    return _modules[key]


_probed: dict[tuple, bool] = {}


def probe(device: torch.device, names: list[str], what: str, instead: str) -> bool:
    """Whether `what` (the kernels `names`) runs on `device`: sm_80+ and they compile and load. Asked once per
    device; a failure (no NVRTC, a driver without cuLaunchKernelEx) is one log line saying what runs `instead`."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if (idx, what) not in _probed:
        ok = torch.cuda.get_device_capability(idx) >= (8, 0)
        if ok:
            try:
                load(device, names)
            except (OSError, RuntimeError, AttributeError) as err:
                log.warning("%s unavailable (%s): %s run instead", what, err, instead)
                ok = False
        _probed[(idx, what)] = ok
    return _probed[(idx, what)]
