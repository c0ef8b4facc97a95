"""AOT-compile the decode GEMMs' folded float16 tiles for sm_90 (no GPU needed) and count the instructions of
their K loop: the number that bounded them at 16-64 rows on the H200 (sessions 7-9, NOTES.md).

    python bench/sass_loop.py [gate_up|dense_q8|dense_mx ...] [--ops]     (default: all three)

Pointers and the shape arguments are compiled as divisible by 16, as the JIT specializes them at run time
(without that hint every load of the loop is a scalar one and the counts mislead). Prints registers, spills, the
loop's instruction count, that count per decoded weight a thread, and with --ops every opcode's count.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real (non-interpreter) code paths
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from kquant_compile import TARGET, usage  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from worker_orcd.kernels import triton_moe as tm  # noqa: E402
from worker_orcd.kernels import triton_quant as tq  # noqa: E402


def _compile(fn, sig: dict, consts: dict, divisible: list[str], warps: int, stages: int):
    sig = sig | {k: "constexpr" for k in consts}
    div = [n for n, t in sig.items() if t.startswith("*")] + divisible
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div})
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def gate_up() -> tuple:
    """The MoE gate/up tile kernel with tiles_config() (two matrices a step)."""
    c = tm.tiles_config()
    sig = {"x_ptr": "*fp16", "pairs_ptr": "*i32", "tile_e_ptr": "*i32", "gw_ptr": "*i32", "ge_ptr": "*u8",
           "gb_ptr": "*fp32", "uw_ptr": "*i32", "ue_ptr": "*u8", "ub_ptr": "*fp32", "h_ptr": "*fp16",
           "part_ptr": "*fp32", "E": "i32", "F": "i32", "D": "i32", "K_SLOTS": "i32", "N_PAIRS": "i32",
           "CHUNK": "i32", "limit": "fp32", "alpha": "fp32"}
    consts = {"BM": c["BM"], "BN": c["BN"], "NB": c["NB"], "DOT_F32": False, "SPLIT": True, "F16": True, "GROUP": 64,
              "W_LEFT": False, "FOLD": True}
    k = _compile(tm._tiles_gate_up_kernel, sig, consts, ["F", "D", "N_PAIRS"], c["num_warps"], c["num_stages"])
    return k, 2 * c["BN"] * c["NB"] * 32 / (32 * c["num_warps"])


def dense(mx: bool) -> tuple:
    """The dense decode GEMM with gemm_config() for a 5120x2880 weight (Q8_0) or an MXFP4 one."""
    w = tq.PackedWeight("mxfp4" if mx else "q8_0", None, None, 5120, 2880, fold=True)
    c = tq.gemm_config(w, 1)
    sig = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*u8" if mx else "*fp16", "y_ptr": "*fp32", "M": "i32",
           "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "CHUNK": "i32"}
    consts = {"IS_MXFP4": mx, "BM": c["BM"], "BN": c["BN"], "NB": c["NB"], "DOT_F32": False, "F16": True,
              "GROUP": 64 if mx else 1, "W_LEFT": False, "FOLD": True, "M_FIRST": c["M_FIRST"]}
    k = _compile(tq._gemm_kernel, sig, consts, ["N", "K", "stride_xm", "stride_ym"], c["num_warps"], c["num_stages"])
    return k, c["BN"] * c["NB"] * 32 / (32 * c["num_warps"])


def loop_ops(k) -> dict[str, int]:
    """Opcode counts of the kernel's longest backward branch (its K loop)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    branches = [(int(m.group(1), 16), int(m.group(2), 16))
                for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+@!?P\d BRA 0x([0-9a-f]+)", sass)]
    end, start = max(((a, t) for a, t in branches if t < a), key=lambda b: b[0] - b[1])
    ops: dict[str, int] = {}
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", line)
        if m and start <= int(m.group(1), 16) <= end:
            ops[m.group(2)] = ops.get(m.group(2), 0) + 1
    return ops


def main() -> None:
    kernels = {"gate_up": gate_up, "dense_q8": lambda: dense(False), "dense_mx": lambda: dense(True)}
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(kernels)
    for name in names:
        k, values = kernels[name]()
        ops = loop_ops(k)
        n = sum(ops.values())
        print(f"{name}: {usage(k)}; K loop {n} instructions, {values:.0f} weights a thread a step: "
              f"{n / values:.2f} a weight", flush=True)
        if "--ops" in sys.argv:
            print("  " + ", ".join(f"{op} {c}" for op, c in sorted(ops.items(), key=lambda o: -o[1])))


if __name__ == "__main__":
    main()
