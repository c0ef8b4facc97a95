"""A short soak in CI: bench/soak.py against a real `worker-orcd serve` on CPU, with the 10-minute run's
criteria (no 5xx, no failed stream, every stream equal to its replay, RSS growth < 5%, clean drain)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_meets_the_criteria(tmp_path):
    out = tmp_path / "soak.json"
    # high cancel/disconnect fractions so that a short run has some of each
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--streams", "4", "--duration", "15", "--max-tokens", "24",
           "--cancel-frac", "0.2", "--disconnect-frac", "0.2", "--replay", "12", "--warmup-rounds", "1",
           "--request-timeout", "60", "--server-log", str(tmp_path / "server.log"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    soak, replay, memory = report["soak"], report["replay"], report["memory"]
    assert report["verdict"] == []
    assert soak["http_5xx"] == 0 and not soak["failures"]
    assert soak["outcomes"].get("completed", 0) >= 4
    assert soak["outcomes"].get("cancelled", 0) + soak["outcomes"].get("cancel_late", 0) >= 1
    assert soak["outcomes"].get("disconnected", 0) >= 1
    assert replay["replayed_full"] >= 4 and replay["mismatches"] == [] and replay["errors"] == []
    assert memory["rss_growth"] is not None and memory["rss_growth"] < 0.05
    assert report["server"]["exit_code"] == 0 and report["server"]["tracebacks"] == 0
    assert soak["ttft_ms"]["p50"] is not None and soak["token_latency_ms"]["p99"] is not None
