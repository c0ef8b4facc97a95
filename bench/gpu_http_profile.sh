#!/usr/bin/env bash
# Where the serving process spends its time at N concurrent streams: `worker-orcd serve --device cuda` on the
# synthetic GPT-OSS-20B under py-spy (raw folded stacks per thread, written to $OUT/serve.raw), driven by
# bench/serve_throughput.py with the streams together only. py-spy's wheel goes in .whl/ with the others.
# Usage (device): bash bench/gpu_http_profile.sh [streams] [tokens] [rounds]
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
streams=${1:-64} tokens=${2:-64} rounds=${3:-4}
synthetic
port=18765
/tmp/site/bin/py-spy record --format raw --threads --nonblocking --rate 250 -o "$out/serve.raw" -- \
  python3 -m worker_orcd.cli serve --host 127.0.0.1 --port $port --device cuda --max-batch "$streams" \
  --ctx 1024 --model "$model" > "$out/serve.log" 2>&1 &
spy=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 1
done
timeout 300 python3 bench/serve_throughput.py --url "http://127.0.0.1:$port" --streams "$streams" \
  --tokens "$tokens" --rounds "$rounds" --no-alone 2>&1 | tail -2 | tee "$out/http.txt"
curl -sf "http://127.0.0.1:$port/metrics" > "$out/metrics.txt"
pkill -INT -f "worker_orcd.cli serve --host 127.0.0.1 --port $port"
wait $spy
ls -la "$out"
