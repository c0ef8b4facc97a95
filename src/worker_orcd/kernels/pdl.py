"""Programmatic dependent launch (Hopper and later) inside CUDA graphs: a decode-step kernel is launched while
the kernel before it still runs, and waits at its first line until that kernel has finished and its writes are
visible.

Every Triton kernel calls `pdl_enter()` before it touches global memory: `gdc_wait` (the kernel before it is
complete: nothing is read or written early) and then `gdc_launch_dependents` (the next kernel may be launched).
Each launch passes `**pdl_launch()`, which asks for the early launch only while a CUDA graph is being captured
(the decode steps). What overlaps is the launch itself and the start of the next grid's programs, never memory
traffic, so results are the same bits as without it; a torch kernel between two of ours is launched plainly
and waits as usual. Eager launches (prompt chunks) are plain: H200, a 2048-token prefill was 3% slower with
it, decode steps 2-5% faster (NOTES, session 10).

On when the GPU can do it (compute capability 9.0+) and this Triton has the instructions;
WORKER_ORCD_PDL=0 turns it off (and the interpreter never uses it).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: no PDL
    gdc_launch_dependents = gdc_wait = None


def _launch_option() -> bool:
    """Whether this Triton's CUDA launcher takes `launch_pdl`."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}


def _supported() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("WORKER_ORCD_PDL", "1") == "0":
        return False
    if gdc_wait is None or not _launch_option() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


PDL = tl.constexpr(_supported())
_EARLY = {"launch_pdl": True}
_PLAIN: dict = {}


def pdl_launch() -> dict:
    """A launch's keyword arguments: the early launch while a CUDA graph is captured, else none."""
    return _EARLY if PDL and torch.cuda.is_current_stream_capturing() else _PLAIN


@triton.jit
def pdl_enter():
    """Wait for the kernel before this one, then let the next one launch (nothing without PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
