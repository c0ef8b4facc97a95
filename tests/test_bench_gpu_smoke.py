"""bench/gpu.py end to end on a tiny GPT-OSS file on CPU: the script a GPU session runs first must not fail
there for a reason a CPU could have shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

fixtures = pytest.importorskip("tests.fixtures.hf_to_gguf")
ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_on_a_tiny_model(tmp_path):
    path = fixtures.write_gguf(fixtures.make_tiny_model("gpt-oss", seed=0), tmp_path / "g.gguf", "MXFP4",
                               dense_type="Q8_0")
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--model", str(path), "--device", "cpu", "--quick",
           "--streams", "2", "--long", "600", "--http", "2", "--http-tokens", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT / "src"),
                         "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"decode, 1 stream (512 prompt)", "prefill 2048", "decode, 2 streams", "HTTP /v1/completions, 2 streams"
            } <= set(table)
