#!/usr/bin/env bash
# Many replicas per GPU starting together under MPS (issue 20, item 2): `mpsserve serve` of the
# torch demo (small tables) with N replicas per GPU and the real control daemon; reports the time
# to all-ready, replicas replaced, refusals seen and restarts logged, then stops everything.
#   usage (GPU host, repo root, PYTHONPATH holding Ray): N=12 tests/gpu/many_replicas_on_gpu_host.sh
set -uo pipefail
export RAY_DEDUP_LOGS=0  # every replica's lines, for the counts below
N=${N:-12}; OUT=${OUT:-/tmp/mpsserve-many}; mkdir -p "$OUT"
# Ray counts the host's cores: 48 replicas at 0.5 CPU would not fit on 16 (ingresses: 1 CPU).
CPUS=${CPUS:-$(python3 -c "print(min(0.5, round(($(nproc) - 2) / $N, 2)))")}
began=$(date +%s)
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
used_before=$(used)
work=$(mktemp -d /tmp/many.XXXX); mps=$work/mps
python3 -m mpsserve.ops.cli demo-model --out "$work/models/rec" --format torch --table-rows 20000 | tail -1
cat > "$work/service.yaml" <<YAML
models:
  - {name: rec, store: models/rec, runtime: torch, placement: {replicas_per_gpu: $N, cpus_per_replica: $CPUS}}
mps: {mode: "on", pipe_dir: $mps/pipe, log_dir: $mps/log, state_dir: $mps/state}
ray: {dashboard: false, app_name: many}
YAML
(cd "$work" && exec python3 -m mpsserve.ops.cli serve --config service.yaml --rows 8) > "$OUT/serve-$N.log" 2>&1 &
pid=$!
for _ in $(seq 480); do
  grep -q "Ctrl-C stops" "$OUT/serve-$N.log" && break; kill -0 "$pid" 2>/dev/null || break; sleep 1
done
up=$(($(date +%s) - began))
address=$(sed -n 's/.*Ray address: *\([^ ]*\).*/\1/p' "$OUT/serve-$N.log" | head -1)
sleep 15  # a few health checks and guardian rounds after all-ready
used_after=$(used)
python3 -m mpsserve.ops.cli status --config "$work/service.yaml" --address "$address" > "$OUT/status-$N.txt" 2>&1
log="$OUT/serve-$N.log"
{
  echo "replicas per GPU: $N (cpus_per_replica $CPUS); serving after ${up}s (model build and Ray start included)"
  echo "GPU memory used: ${used_before} MiB before, ${used_after} MiB serving: $(( (used_after - used_before) / N )) MiB per replica (context, model, CUDA graphs, allocator cache)"
  echo "status exit: $(tail -1 "$OUT/status-$N.txt")"
  echo "health checks failed: $(grep -c 'Health check for Replica' "$log")"
  echo "daemon busy refusals noted: $(grep -ci 'busy' "$log")"
  echo "daemon starts logged: $(grep -c 'first start\|started the MPS control daemon' "$log")"
  echo "restarts logged: $(grep -c 'restarting (restart' "$log")"
  echo "attached: $(grep -c 'MPS client of server' "$log")"
} | tee "$OUT/summary-$N.txt"
kill -INT "$pid"; for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
echo quit | CUDA_MPS_PIPE_DIRECTORY=$mps/pipe CUDA_MPS_LOG_DIRECTORY=$mps/log timeout 10 nvidia-cuda-mps-control
echo "done in $(($(date +%s) - began)) s" | tee -a "$OUT/summary-$N.txt"
