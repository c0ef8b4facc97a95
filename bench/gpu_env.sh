# Sourced by the device scripts (gpu_session.sh, gpu_http_profile.sh) from the repository root: the carried
# wheels (.whl/, gitignored) installed to /tmp/site, the import path, the output folder $out ($OUT on the device
# tool, else /tmp/gpu-session), and `synthetic`, which builds the synthetic GPT-OSS-20B at $model once (~40 s).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src:. TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
model=/tmp/gpt-oss-20b-synthetic-q8_0.gguf
synthetic() { [[ -f $model ]] || python3 bench/make_synthetic.py "$model" > "$out/make-synthetic.txt" 2>&1; }
