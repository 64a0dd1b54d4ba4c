#!/usr/bin/env bash
# The fault matrix (python -m benchmarks.fault_matrix) on the GPU host: `mpsserve serve` of the
# torch demo model (no TensorFlow there), 8 fractional-GPU replicas under MPS with CUDA graphs,
# 2 ingress replicas; every case under 16 concurrent 2000-row requests; then the service and
# its MPS daemon are stopped. Results land in $OUT (fault-matrix.{json,md}, serve.log, ...).
# Ends within BUDGET_S (510 s): the matrix is cut with SIGINT when time runs short (the cases
# done are in the results file).
#   usage: tests/gpu/fault_matrix_on_gpu_host.sh   (repo root, PYTHONPATH holding Ray)
#   env: OUT, CONC (16), PROCS (4), INGRESSES (2), POLL_S (store poll, 2), BASELINE_S (5),
#        WINDOW_S (20), EXTRA_S (30), QUIET_S (5), STOP_S (45), GAP_S (12), SETTLE_S (60),
#        CASES (all), BUDGET_S (510), PINNED_MB (mps.limits.pinned_mem_limit_mb; unset: derived),
#        FAULT_KIND (address|assert, for gpu-client-fault). The injected cases (gpu-client-fault,
#        device-memory-over-limit) run only with INJECT=1, which sets MPSSERVE_INJECT_FAULT_FILE.
set -uo pipefail
began=$(date +%s)
OUT=${OUT:-/tmp/mpsserve-fault-matrix}
CONC=${CONC:-16}; PROCS=${PROCS:-4}; INGRESSES=${INGRESSES:-2}; POLL_S=${POLL_S:-2}
BASELINE_S=${BASELINE_S:-5}; WINDOW_S=${WINDOW_S:-20}; EXTRA_S=${EXTRA_S:-30}
QUIET_S=${QUIET_S:-5}; STOP_S=${STOP_S:-45}; GAP_S=${GAP_S:-12}; SETTLE_S=${SETTLE_S:-60}
BUDGET_S=${BUDGET_S:-510}
# the MPS daemon last: every replica is replaced after it, and a cut budget loses the end
CASES=${CASES:-kill-model-replica,kill-ingress,stop-model-replica-45s,publish-new-version,publish-corrupt-version,publish-slow-version,kill-mps-daemon}
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p "$OUT"
work=$(mktemp -d /tmp/mpsfm.XXXX)
mps=$work/mps  # short: the daemon's pipe is a unix socket path
[ "${INJECT:-0}" = 1 ] && export MPSSERVE_INJECT_FAULT_FILE=$work/inject  # tests only
limits=${PINNED_MB:+, limits: {pinned_mem_limit_mb: $PINNED_MB\}}
left() { echo $((BUDGET_S - ($(date +%s) - began))); }

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader \
  | tee "$OUT/gpu.txt"
python3 -m mpsserve.ops.cli demo-model --out "$work/models/rec" --format torch | tail -1
cat > "$work/service.yaml" <<YAML
models:
  - name: rec
    store: models/rec
    runtime: torch
    poll_interval_s: $POLL_S
    placement: {replicas_per_gpu: 8}
ingress: {replicas: $INGRESSES}
mps: {mode: "on", pipe_dir: $mps/pipe, log_dir: $mps/log, state_dir: $mps/state$limits}
ray: {dashboard: false, app_name: faultmatrix}   # the offline bundle has no dashboard client
YAML
cp "$work/service.yaml" "$OUT/service.yaml"

(cd "$work" && exec python3 -m mpsserve.ops.cli serve --config service.yaml --rows 8) \
  > "$OUT/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 240); do
  grep -q "Ctrl-C stops" "$OUT/serve.log" && break; kill -0 "$serve_pid" 2>/dev/null || break
  sleep 1
done
if grep -q "Ctrl-C stops" "$OUT/serve.log"; then
  address=$(sed -n 's/.*Ray address: *\([^ ]*\).*/\1/p' "$OUT/serve.log" | head -1)
  echo "service up after $(($(date +%s) - began)) s; Ray at $address" | tee "$OUT/summary.txt"
  cmd=(python3 -m benchmarks.fault_matrix --config "$work/service.yaml" --address "$address"
       --cases "$CASES" --concurrency "$CONC" --processes "$PROCS" --baseline-s "$BASELINE_S"
       --window-s "$WINDOW_S" --max-extra-s "$EXTRA_S" --quiet-s "$QUIET_S" --stop-s "$STOP_S"
       --slow-gap-s "$GAP_S" --settle-timeout-s "$SETTLE_S" --fault-kind "${FAULT_KIND:-address}"
       --out "$OUT/fault-matrix.json" --markdown "$OUT/fault-matrix.md")
  echo "${cmd[*]}" > "$OUT/command.txt"
  matrix_s=$(($(left) - 45))  # keep 45 s to stop the service and the daemon
  echo "matrix budget: $matrix_s s" | tee -a "$OUT/summary.txt"
  timeout -s INT -k 20 "$matrix_s" "${cmd[@]}" 2> "$OUT/fault-matrix.log" | tee -a "$OUT/summary.txt"
  echo "fault matrix exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
  python3 -m mpsserve.ops.cli status --config "$work/service.yaml" --address "$address" \
    > "$OUT/status-after.txt" 2>&1
else
  echo "serve did not come up:" | tee "$OUT/summary.txt"; tail -40 "$OUT/serve.log"
fi

kill -INT "$serve_pid" 2>/dev/null
for _ in $(seq 30); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 1; done
kill -0 "$serve_pid" 2>/dev/null && { echo "serve did not stop; SIGKILL"; kill -KILL "$serve_pid"; }
wait "$serve_pid" 2>/dev/null
tail -3 "$OUT/serve.log"
daemon=$(cat "$mps/pipe/nvidia-cuda-mps-control.pid" 2>/dev/null)
if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then  # ours: its pipe is in $work
  echo quit | CUDA_MPS_PIPE_DIRECTORY=$mps/pipe CUDA_MPS_LOG_DIRECTORY=$mps/log \
    timeout 10 nvidia-cuda-mps-control
  echo "quit the MPS daemon $daemon" | tee -a "$OUT/summary.txt"
fi
echo "done in $(($(date +%s) - began)) s" | tee -a "$OUT/summary.txt"
