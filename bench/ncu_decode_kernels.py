"""One launch each of the decode kernels worth profiling, for Nsight Compute (GPT-OSS-20B shapes, random weights):

    bench/gpu_session.sh ncu  (Nsight Compute: occupancy, throughput, stalls of each)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_engine_kernels import GPT_OSS_MOE, gpt_oss_experts  # noqa: E402

from tests.test_triton_quant import random_blocks  # noqa: E402
from worker_orcd.kernels import triton_moe  # noqa: E402
from worker_orcd.kernels.triton_quant import pack_q8_0, quant_matmul  # noqa: E402

t = int(sys.argv[1]) if len(sys.argv) > 1 else 1
E, F, D = GPT_OSS_MOE
experts = gpt_oss_experts("cuda")
x = torch.randn(t, D, device="cuda", dtype=torch.bfloat16)
ids = torch.stack([torch.randperm(E)[:4] for _ in range(t)]).cuda()
w = torch.softmax(torch.randn(t, 4, device="cuda"), -1)
qkv = pack_q8_0(random_blocks(T.Q8_0, 5120, 2880, "cuda"), 5120, 2880)
for _ in range(3):  # compile, then the profiled launches
    triton_moe.moe_tiles(x, ids, w, *experts)
    quant_matmul(qkv, x)
torch.cuda.synchronize()
