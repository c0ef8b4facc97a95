#!/usr/bin/env bash
# A burst of streaming /v1/completions against `worker-orcd serve --device cuda` on the synthetic GPT-OSS-20B,
# with the server's Triton compiles and scheduler steps traced (bench/serve_compiles.py --trace-steps) to
# $out/serve$TAG.log. Usage (device): [SWITCH_MS=0.5] [TAG=-x] bash bench/gpu_serve_trace.sh [streams] [tokens]
# [extra serve_throughput args]
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
streams=${1:-64} tokens=${2:-64}
shift 2 2>/dev/null
synthetic
port=${PORT:-18766}
python3 bench/serve_compiles.py --trace-steps ${SWITCH_MS:+--switch-interval-ms $SWITCH_MS} serve --host 127.0.0.1 --port $port --device cuda \
  --max-batch "$streams" --model "$model" > "$out/serve${TAG:-}.log" 2>&1 &
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 1; done
echo "ready $(date +%s.%N)" > "$out/marks${TAG:-}.txt"
for round in 1 2; do
  echo "burst $round $(date +%s.%N)" >> "$out/marks${TAG:-}.txt"
  timeout 120 python3 bench/serve_throughput.py --url "http://127.0.0.1:$port" --streams "$streams" \
    --tokens "$tokens" --no-alone --openai "$@" 2>&1 | tail -1
done
pkill -INT -f "serve_compiles.py --trace-steps"
sleep 2
echo "compiles after ready: $(awk -v r="$(cut -d' ' -f2 "$out/marks${TAG:-}.txt" | head -1)" '/^triton-compile/ && $2 > r' "$out/serve${TAG:-}.log" | wc -l)"
