#!/usr/bin/env bash
# mpsserve's own path on the GPU host: for each scenario of deployments/bench/, start
# `mpsserve serve`, drive it with benchmarks.loadgen (HTTP binary tensors, then gRPC), stop it.
#   usage (repo root, PYTHONPATH holding Ray): benchmarks/run_gpu.sh mps no-mps single cpu
#   env: OUT (results folder), CONC (concurrency sweep, default 8,32), DUR (seconds per step),
#        PROCS (client processes, default 4), PROTOS (default "http grpc"); per-process CPU is sampled into $OUT/ps-<s>.log
set -uo pipefail
OUT=${OUT:-/tmp/mpsserve-bench-out}; CONC=${CONC:-8,32}; DUR=${DUR:-10}; PROCS=${PROCS:-4}
mkdir -p "$OUT"
python3 -m mpsserve.ops.cli demo-model --out /tmp/mpsserve-bench/models/rec --format torch --if-missing
for s in "$@"; do
  log="$OUT/serve-$s.log"
  python3 -m mpsserve.ops.cli serve --config "deployments/bench/$s.yaml" --rows 8 > "$log" 2>&1 &
  pid=$!
  for _ in $(seq 400); do
    grep -q "Ctrl-C stops" "$log" && break; kill -0 "$pid" 2>/dev/null || break; sleep 1
  done
  if grep -q "Ctrl-C stops" "$log"; then
    (while kill -0 "$pid" 2>/dev/null; do sleep 6; date +%T; ps -eo pid,pcpu,rss,args --sort=-pcpu \
       | head -25 | cut -c1-150; done) > "$OUT/ps-$s.log" 2>&1 &
    for p in ${PROTOS:-http grpc}; do
      proto="--url http://127.0.0.1:8000"; [ "$p" = grpc ] && proto="--grpc 127.0.0.1:9000"
      python3 -m benchmarks.loadgen $proto --model rec --rows 2000 --label "$s" \
        --concurrency "$CONC" --duration-s "$DUR" --warmup-s 3 --processes "$PROCS" \
        --out "$OUT/results.json" --markdown "$OUT/table.md"
    done
  else
    echo "scenario $s did not come up:"; tail -30 "$log"
  fi
  kill -INT "$pid"; wait "$pid"
done
cat "$OUT/table.md"
