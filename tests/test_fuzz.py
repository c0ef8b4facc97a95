"""The atheris harnesses in fuzz/, each run for a bounded time from the seed corpus: zero crashes.

A crash is any exception other than GGUFError/TokenizerError, a broken invariant, an input that runs
past -timeout seconds, or the process passing -rss_limit_mb. The longer run is in fuzz/README.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).parents[1]
SECONDS = {"fuzz_gguf": 45, "fuzz_tokenizer": 75}  # about 2.5 minutes in all with startup and seeds
FLAGS = ["-seed=1", "-timeout=20", "-rss_limit_mb=3072", "-max_len=131072", "-print_final_stats=1"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    from fuzz.corpus import build_corpus

    out = tmp_path_factory.mktemp("seeds")
    build_corpus(out)
    return out


def run_harness(harness: str, seconds: int, seeds: Path, out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run one harness; returns the process and libFuzzer's final stats."""
    work = out / "corpus"
    work.mkdir()
    cmd = [sys.executable, str(ROOT / "fuzz" / f"{harness}.py"), f"-max_total_time={seconds}", *FLAGS,
           f"-artifact_prefix={out}/", str(work), str(seeds)]
    # through a shell that forks it: Linux carries a process's peak RSS across exec, so a harness exec'd
    # straight from a pytest that has grown past -rss_limit_mb would report an "oom" on its first input
    cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 180, cwd=out)
    stats = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s+(\d+)", proc.stderr)}
    return proc, stats


@pytest.mark.parametrize("harness", list(SECONDS))
def test_harness_finds_no_crash(harness, seeds, tmp_path, record_property):
    proc, stats = run_harness(harness, SECONDS[harness], seeds, tmp_path)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    assert proc.returncode == 0 and not found, (
        f"{harness}: exit {proc.returncode}, inputs kept in {tmp_path}: {found}\n"
        f"reproduce: python fuzz/{harness}.py <input>\n{proc.stderr[-6000:]}")
    runs = stats["number_of_executed_units"]
    record_property("executions", runs)
    record_property("executions_per_second", stats["average_exec_per_sec"])
    assert runs >= 1000, stats
