#!/usr/bin/env bash
# On the GPU host (no TensorFlow there, so the torch runtime): the GPU test tier, then
# `mpsserve serve` of the torch demo with 4 fractional-GPU replicas, the printed request run
# as printed, and the replica processes as NVML sees them. Results land in $OUT.
#   usage: tests/gpu/run_on_gpu_host.sh   (from the repo root, PYTHONPATH holding Ray)
set -uo pipefail
OUT=${OUT:-/tmp/mpsserve-gpu-out}
mkdir -p "$OUT"
work=$(mktemp -d)
nvidia-smi --query-gpu=name,compute_cap,driver_version,compute_mode,memory.total --format=csv \
  | tee "$OUT/gpu.txt"
python3 -m pytest tests/gpu -q -s -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest-gpu.txt" | tail -3
echo "--- doctor, embedded default config (daemon not started yet)" | tee "$OUT/doctor.txt"
python3 -m mpsserve.ops.cli doctor --config deployments/local.yaml 2>&1 | tee -a "$OUT/doctor.txt"
echo "doctor exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/doctor.txt"
printf 'models: [{name: rec, store: /tmp}]\nmps: {pipe_dir: /etc/hostname/pipe}\n' > "$work/broken.yaml"
echo "--- doctor, a pipe directory that cannot be created" | tee -a "$OUT/doctor.txt"
python3 -m mpsserve.ops.cli doctor --config "$work/broken.yaml" 2>&1 | tail -1 | tee -a "$OUT/doctor.txt"
python3 -m mpsserve.ops.cli demo-model --out "$work/models/rec" --format torch | tee "$OUT/demo.txt"
cat > "$work/gpu.yaml" <<YAML
models:
  - {name: rec, store: models/rec, runtime: torch, placement: {replicas_per_gpu: 4}}
mps: {mode: "off"}
ray: {dashboard: false}   # the offline bundle carries no dashboard web client
YAML
repo=$PWD
(cd "$work" && exec python3 -m mpsserve.ops.cli serve --config gpu.yaml) > "$OUT/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 240); do grep -q "Ctrl-C stops" "$OUT/serve.log" && break; sleep 1; done
grep -q "Ctrl-C stops" "$OUT/serve.log" || { echo "serve did not come up"; tail -40 "$OUT/serve.log"; }
curl_cmd=$(sed -n '/^Try it/,/^$/p' "$OUT/serve.log" | sed '1d;/^$/d' | sed 's/\\$//' | tr -d '\n')
echo "printed request: $curl_cmd" | tee "$OUT/request.txt"
(cd "$work" && bash -c "$curl_cmd") | tee -a "$OUT/request.txt"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv | tee "$OUT/apps.txt"
kill -INT "$serve_pid"; wait "$serve_pid"; echo "serve exit code: $?" | tee -a "$OUT/request.txt"
tail -3 "$OUT/serve.log"
cd "$repo"
