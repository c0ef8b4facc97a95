"""AOT-compile the nibble-format kernels (kernels/triton_kquant.py) for sm_90 with their real configs, without a
GPU: catches what the interpreter accepts and the compiler rejects, and prints registers and spills.

    python bench/kquant_compile.py [BN[/warps[/stages]] ...]      (default: the configured tiles)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the real (non-interpreter) code paths

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from worker_orcd.kernels import triton_kquant as kq  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SCALE_TYPES = {"q4_0": "*fp16", "q5_0": "*fp16", "q4_1": "*fp16", "q5_1": "*fp16", "q4_k": "*i32", "q5_k": "*i32",
               "q6_k": "*u8"}
HIGH_TYPES = {0: "*i32", 1: "*u8", 2: "*i16"}


def compile_gemm(kind: str, cfg: dict) -> triton.compiler.CompiledKernel:
    fmt = kq.FORMAT_ARGS[kind]
    sig = {"x_ptr": "*bf16", "q_ptr": "*i32", "h_ptr": HIGH_TYPES[fmt["HIGH"]], "s_ptr": SCALE_TYPES[kind],
           "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "CHUNK": "i32"}
    consts = {"KIND": kind, **fmt, "BM": cfg["BM"], "BN": cfg["BN"], "WS": kq.WS, "DOT_F32": False}
    sig |= {name: "constexpr" for name in consts}
    src = ASTSource(fn=kq._gemm_kernel, signature=sig, constexprs={(kq._gemm_kernel.arg_names.index(k),): v
                                                                    for k, v in consts.items()})
    return triton.compile(src, target=TARGET, options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def compile_dequant(kind: str) -> triton.compiler.CompiledKernel:
    fmt = kq.FORMAT_ARGS[kind]
    sig = {"q_ptr": "*i32", "h_ptr": HIGH_TYPES[fmt["HIGH"]], "s_ptr": SCALE_TYPES[kind], "out_ptr": "*bf16",
           "N": "i32", "K": "i32"}
    consts = {"KIND": kind, **fmt, "BN": 32, "WS": kq.WS}
    sig |= {name: "constexpr" for name in consts}
    src = ASTSource(fn=kq._dequant_kernel, signature=sig, constexprs={(kq._dequant_kernel.arg_names.index(k),): v
                                                                       for k, v in consts.items()})
    return triton.compile(src, target=TARGET, options={"num_warps": 4})


def usage(k: triton.compiler.CompiledKernel) -> str:
    """Registers and spill bytes from the cubin (CompiledKernel.n_regs needs a device to load it)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack, local = (re.search(rf"{w}:(\d+)", out).group(1) for w in ("REG", "STACK", "LOCAL"))
    return f"{regs} regs, stack {stack} B, local (spills) {local} B"


def main() -> None:
    base = kq.kquant_gemm_config(None)
    for arg in sys.argv[1:] or [f"{base['BN']}/{base['num_warps']}/{base['num_stages']}"]:
        cfg = base | dict(zip(("BN", "num_warps", "num_stages"), map(int, arg.split("/"))))
        for kind in kq.FORMAT_ARGS:
            g = compile_gemm(kind, cfg)
            d = compile_dequant(kind)
            print(f"{kind} gemm BN={cfg['BN']} warps={cfg['num_warps']} stages={cfg['num_stages']}: {usage(g)}, "
                  f"{g.metadata.shared} B shared | dequant: {usage(d)}")


if __name__ == "__main__":
    main()
