"""Is the MXFP4 expert GEMM bound by its memory access pattern? Reads the 20B's gate/up expert codes (all 32
experts, 5760 x 2880 MXFP4 each: 265 MB of words) the way the decode kernels do, with no decode, and the same
bytes laid out tile-major, and prints the bandwidth of each beside the device's copy bandwidth.

Usage: python bench/gpu_access_pattern.py   (CUDA)

  row-major   codes [rows, 360 words]: a program reads 128 rows x 4 words (one block) a step over its split of
              the 90 blocks (what _tiles_gate_up_kernel and _gemm_kernel read): 128 runs of 16 bytes
  tile-major  the same words stored [row tile, block, 128 rows, 4 words]: a step reads 2 KB in one run
Each at NB = 1, 2, 4 blocks a step and with the splits the kernels use (8).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine_kernels import time_us  # noqa: E402


@triton.jit
def _read_kernel(w_ptr, out_ptr, NBLK, CHUNK, TILE_MAJOR: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, BN)
    i = tl.arange(0, NB * 4)
    acc = tl.zeros([BN, NB * 4], dtype=tl.int32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, NBLK)
    for kb in range(lo, hi, NB):
        ok = (kb * 4 + i < hi * 4)[None, :]
        if TILE_MAJOR:  # [tile, block, BN, 4]: NB blocks of the tile are NB runs of BN*16 bytes
            off = ((tile * NBLK + kb + i // 4) * BN)[None, :] * 4 + r[:, None] * 4 + (i % 4)[None, :]
        else:  # [rows, NBLK * 4]
            off = (tile * BN + r)[:, None] * (NBLK * 4) + kb * 4 + i[None, :]
        acc ^= tl.load(w_ptr + off, mask=ok, other=0)
    tl.store(out_ptr + (tile * tl.num_programs(1) + split) * BN + r, tl.sum(acc, axis=1))


def main() -> None:
    rows, nblk, BN = 32 * 5760, 90, 128
    w = torch.randint(-(2**31), 2**31 - 1, (rows, nblk * 4), dtype=torch.int32, device="cuda")
    nbytes = w.numel() * 4
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    copy = time_us(lambda: src.clone(), iters=20)
    print(f"{torch.cuda.get_device_name()}: copy {2 * src.numel() / copy / 1e6:.2f} TB/s (read+write); "
          f"codes {nbytes / 1e6:.0f} MB")
    for tile_major in (False, True):
        for nb in (1, 2, 4):
            for splits in (1, 8):
                chunk = -(-nblk // splits)
                chunk = -(-chunk // nb) * nb
                splits = -(-nblk // chunk)
                out = torch.empty(rows // BN * splits * BN, dtype=torch.int32, device="cuda")
                for warps in (2, 4):
                    us = time_us(lambda nb=nb, chunk=chunk, splits=splits, out=out, warps=warps, tm=tile_major:
                                 _read_kernel[(rows // BN, splits)](w, out, nblk, chunk, TILE_MAJOR=tm, BN=BN, NB=nb,
                                                                    num_warps=warps, num_stages=3), iters=20)
                    print(f"  {'tile-major' if tile_major else 'row-major '} NB={nb} splits={splits} warps={warps}: "
                          f"{us:7.1f} us  {nbytes / us / 1e6:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
