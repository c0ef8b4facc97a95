set -uo pipefail
source bench/gpu_env.sh
timeout 200 python3 -m pytest -p no:cacheprovider -m gpu -q tests 2>&1 | tee $out/gpu-tests.log | grep -E "passed|failed|FAILED|Error" | tail -12
synthetic
timeout 150 python3 bench/gpu.py --model "$model" 2>&1 | tee "$out/gpu.txt" | grep -E "decode|prefill|VRAM"
timeout 100 python3 bench/gpu_step_profile.py --model "$model" --batches 1,64 --top 8 2>&1 | tee "$out/step-profile.txt" | grep -v -i warn | tail -22
