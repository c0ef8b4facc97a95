"""What one dependent kernel costs in a CUDA graph at the least: chains of small Triton kernels, each reading
what the one before wrote, captured and replayed, with and without programmatic dependent launch (PDL).

Usage: python bench/gpu_launch_floor.py   (WORKER_ORCD_PDL=0 for the plain launches)

A decode step at one row is ~300 such dependent launches; this is the floor each of them adds to it whatever
its body does. Rows: one program of 128 threads touching one row of 4,096 floats (about a norm's row); 132
programs each touching 16 KB (a small sum kernel); and the first with a grid-wide last-arriver count (an
atomic a program, the last to arrive doing the next step's work in the same launch), what fusing a sum kernel
into the kernel before it would cost instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gpu_engine_kernels import graph_us  # bench/ is on sys.path when this runs as a script

from worker_orcd.kernels import pdl
from worker_orcd.kernels.pdl import pdl_enter, pdl_launch


@triton.jit
def _step_kernel(src, dst, N, BLOCK: tl.constexpr):
    pdl_enter()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + i, tl.load(src + i, mask=i < N, other=0.0) + 1.0, mask=i < N)


@triton.jit
def _arrive_kernel(src, dst, count, N, BLOCK: tl.constexpr):
    pdl_enter()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + i, tl.load(src + i, mask=i < N, other=0.0) + 1.0, mask=i < N)
    tl.debug_barrier()
    n = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    if n == tl.num_programs(0) - 1:
        tl.store(count, 0)
        j = tl.arange(0, BLOCK)
        tl.store(dst + N + j, tl.load(dst + j, cache_modifier=".cg") * 2.0)


def chain_us(programs: int, block: int, n_launch: int = 200, arrive: bool = False) -> float:
    N = programs * block
    bufs = [torch.zeros(N + block, device="cuda") for _ in range(2)]
    count = torch.zeros(1, dtype=torch.int32, device="cuda")

    def run() -> None:
        for k in range(n_launch):
            src, dst = bufs[k % 2], bufs[(k + 1) % 2]
            if arrive:
                _arrive_kernel[(programs,)](src, dst, count, N, BLOCK=block, num_warps=4, **pdl_launch())
            else:
                _step_kernel[(programs,)](src, dst, N, BLOCK=block, num_warps=4, **pdl_launch())

    return graph_us(run, iters=1, replays=20) / n_launch


def main() -> None:
    rows = []
    for name, programs, block, arrive in [("1 program, 4,096 floats", 1, 4096, False),
                                          ("132 programs, 16 KB each", 132, 4096, False),
                                          ("1 program + last-arriver count", 1, 4096, True),
                                          ("132 programs + last-arriver count", 132, 4096, True)]:
        rows.append(f"  {name:36s} {chain_us(programs, block, arrive=arrive):6.2f} us a launch")
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, PDL {bool(pdl.PDL)}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
