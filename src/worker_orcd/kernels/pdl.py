"""Programmatic dependent launch (Hopper and later): a decode-step kernel is launched while the kernel before it
still runs, and waits at its first line until that kernel has finished and its writes are visible.

Every Triton kernel of the decode step calls `pdl_enter()` before it touches global memory: `gdc_wait` (the
kernel before it is complete: nothing is read or written early) and then `gdc_launch_dependents` (the next
kernel may be launched). Each launch passes `**LAUNCH`. What overlaps is the launch itself and the start of the
next grid's programs, never memory traffic, so results are the same bits as without it; a torch kernel between
two of ours is launched plainly and waits as usual.

On when the GPU can do it (compute capability 9.0+) and this Triton has the instructions;
WORKER_ORCD_PDL=0 turns it off (and the interpreter never uses it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: no PDL
    gdc_launch_dependents = gdc_wait = None


def _supported() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("WORKER_ORCD_PDL", "1") == "0":
        return False
    if gdc_wait is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


PDL = tl.constexpr(_supported())
LAUNCH = {"launch_pdl": True} if PDL else {}


@triton.jit
def pdl_enter():
    """Wait for the kernel before this one, then let the next one launch (nothing without PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
