#!/usr/bin/env bash
# Everything issue 8 measures, in as few device calls as possible (each call may run 10 minutes).
#
# The device machine has torch, triton and transformers but no gguf or pytest: the pure-Python wheels in
# .whl/ (gitignored; `pip download --no-deps -d .whl gguf pytest pluggy iniconfig`) travel with the
# working tree. With the device tool:  run(command="bash bench/gpu_session.sh tests", carry=[".whl"])
# then  run(command="bash bench/gpu_session.sh bench", carry=[".whl"]).
#
#   tests   every @pytest.mark.gpu test (kernels, models against transformers, CUDA graphs, the scheduler on
#           graphs, sink attention on CUDA, the real-model decode path where the model files are present);
#           exits with pytest's status, 1 without a CUDA device; also `make test-gpu`. Its last line
#           (gpu-tests-summary.txt) is NOTES.md's "GPU tests, last run".
#   ncu     Nsight Compute sections for the decode GEMMs (bench/ncu_decode_kernels.py) at 1 and 64 tokens
#   bench   the synthetic GPT-OSS-20B (built if missing, ~40 s), bench/gpu.py with CUDA graphs, then eager
#   prompts the HTTP rows (16, 64 streams) with prompt chunks as graph rows (the default) and as eager forwards
#           (WORKER_ORCD_GRAPHED_PROMPTS=0): session 9 saw 16 streams fall and 64 rise with graph rows
# Logs go to $OUT (the device tool brings them back) or /tmp/gpu-session.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

case "${1:-tests}" in
  tests)
    # every -m gpu test; without a CUDA device conftest.py would skip them all and "pass", so refuse instead
    python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to test')" || exit 1
    python3 -m pytest -p no:cacheprovider -m gpu -q -rs tests 2>&1 | tee "$out/gpu-tests.log" | tail -40
    rc=${PIPESTATUS[0]}
    # the line for NOTES.md ("GPU tests, last run")
    echo "$(date -u +%F) $(head -1 "$out/device.txt"): $(tail -1 "$out/gpu-tests.log") (exit $rc)" | tee "$out/gpu-tests-summary.txt"
    exit "$rc"
    ;;
  bench)
    synthetic
    WORKER_ORCD_CUDA_GRAPHS=1 timeout 400 python3 bench/gpu.py --model "$model" 2>&1 | tee "$out/gpu-graphs.txt" | tail -14
    timeout 150 python3 bench/gpu.py --model "$model" --no-graphs --quick --streams 4 2>&1 | tee "$out/gpu-eager.txt" | tail -14
    ;;
  engine)
    # the GPU engine's kernels and models (one device call): kernel tests, kernel timings, the 20B table
    [[ ${TESTS:-1} == 1 ]] && timeout 240 python3 -m pytest -p no:cacheprovider -m gpu -q -rs tests 2>&1 \
      | tee "$out/gpu-tests.log" | grep -E "passed|failed|Error|FAILED" | tail -30
    [[ ${KERNELS:-1} == 1 ]] && timeout 100 python3 bench/gpu_engine_kernels.py 2>&1 | tee "$out/kernels.txt" | tail -40
    synthetic
    timeout 150 python3 bench/gpu.py --model "$model" 2>&1 | tee "$out/gpu-graphs.txt" | tail -11
    WORKER_ORCD_NONDETERMINISTIC=1 timeout 100 python3 bench/gpu.py --model "$model" --streams 4,16 --long 0 \
      2>&1 | tee "$out/gpu-nondet.txt" | tail -7
    # session 6's switches, written and not timed: Q8_0 codes in row groups; weights as the dots' left operand
    WORKER_ORCD_Q8_ROW_GROUP=64 timeout 100 python3 bench/gpu.py --model "$model" --streams 16,64 --long 0 \
      2>&1 | tee "$out/gpu-q8-groups.txt" | grep decode
    WORKER_ORCD_W_LEFT=1 timeout 100 python3 bench/gpu.py --model "$model" --streams 16,64 --long 0 \
      2>&1 | tee "$out/gpu-w-left.txt" | grep decode
    # where each kernel's time goes at 1 and 64 rows
    timeout 120 python3 bench/gpu_step_profile.py --model "$model" --batches 1,64 --top 10 2>&1 \
      | tee "$out/step-profile.txt" | grep -v -i warn | tail -30
    ;;
  prompts)
    synthetic
    for g in 1 0; do
      echo "WORKER_ORCD_GRAPHED_PROMPTS=$g"
      WORKER_ORCD_GRAPHED_PROMPTS=$g timeout 280 python3 bench/gpu.py --model "$model" --streams 16,64 --long 0 \
        --http 16,64 2>&1 | tee "$out/http-graphed-prompts-$g.txt" | grep -E "decode, (16|64)|HTTP"
    done
    ;;
  http)
    # worker-orcd serve --device cuda on the synthetic 20B: N concurrent greedy streams over HTTP
    synthetic
    for n in ${STREAMS:-16 64}; do
      SERVE_LOG="$out/serve-$n.log" timeout ${HTTP_TIMEOUT:-200} python3 bench/serve_throughput.py --model "$model" \
        --device cuda --streams "$n" --tokens 64 --max-batch 64 2>&1 | tee "$out/http-$n.txt" | tail -2
    done
    # the same 64 streams with the overlapped decode off (session 5's change, never measured): its gain
    [[ ${SERIAL:-1} == 1 ]] && WORKER_ORCD_OVERLAP=0 SERVE_LOG="$out/serve-64-serial.log" timeout 200 python3 \
      bench/serve_throughput.py --model "$model" --device cuda --streams 64 --tokens 64 --max-batch 64 --no-alone \
      2>&1 | tee "$out/http-64-serial.txt" | tail -2
    ;;
  ncu)
    # Nsight Compute on one launch of each decode GEMM (MoE gate/up and down, a dense Q8_0) at 1 and 64 tokens
    for t in 1 64; do
      timeout 200 ncu --kernel-name regex:'_tiles_gate_up|_tiles_down|_gemm_kernel' --launch-skip 3 --launch-count 3 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
        --section LaunchStats python3 bench/ncu_decode_kernels.py "$t" 2>&1 | grep -v -i warn > "$out/ncu-$t.txt"
    done
    grep -h -E "_kernel \(|Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Waves" \
      "$out"/ncu-*.txt
    ;;
  *)
    echo "usage: bench/gpu_session.sh tests|bench|engine|http|ncu" >&2
    exit 2
    ;;
esac
