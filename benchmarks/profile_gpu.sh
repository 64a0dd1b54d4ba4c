#!/usr/bin/env bash
# Where the serving path spends its CPU: start a scenario, drive it, and while it is loaded
# sample per-process CPU (top), per-thread CPU (benchmarks.thread_cpu) and py-spy stacks (with
# native frames, busy samples only) of one ingress and one model replica.
#   usage (GPU host, repo root, PYTHONPATH holding Ray and py-spy): benchmarks/profile_gpu.sh mps
#   env: OUT, CONC (default 32), PROTO (http|grpc), SECONDS (py-spy window, default 10)
set -uo pipefail
s=${1:-mps}; OUT=${OUT:-/tmp/mpsserve-profile}; CONC=${CONC:-32}; PROTO=${PROTO:-http}
SECONDS_=${SECONDS:-10}
mkdir -p "$OUT"
python3 -m mpsserve.ops.cli demo-model --out /tmp/mpsserve-bench/models/rec --format torch --if-missing
python3 -m mpsserve.ops.cli serve --config "deployments/bench/$s.yaml" --rows 8 > "$OUT/serve-$s.log" 2>&1 &
pid=$!
for _ in $(seq 400); do grep -q "Ctrl-C stops" "$OUT/serve-$s.log" && break; sleep 1; done
target="--url http://127.0.0.1:8000"; [ "$PROTO" = grpc ] && target="--grpc 127.0.0.1:9000"
python3 -m benchmarks.loadgen $target --model rec --rows 2000 --label "$s-profile" \
  --concurrency "$CONC" --duration-s $((SECONDS_ + 12)) --warmup-s 3 --processes 6 \
  --out "$OUT/profile-load.json" > "$OUT/load.log" 2>&1 &
load=$!
sleep 8
top -b -n 2 -d 5 -w 200 | awk '/^top -/{n++} n==2' | head -40 > "$OUT/top-$s.txt"
ingress=$(pgrep -f "ServeReplica:mpsserve:ingress" | head -1)
model=$(pgrep -f "ServeReplica:mpsserve:model-rec" | head -1)
python3 -m benchmarks.thread_cpu "$ingress" "$model" --seconds "$SECONDS_" > "$OUT/threads-$s.txt" &
threads=$!
"${PYSPY:-py-spy}" record -p "$ingress" -d "$SECONDS_" -r 100 --threads --native -f raw -o "$OUT/ingress.txt" &
"${PYSPY:-py-spy}" record -p "$model" -d "$SECONDS_" -r 100 --threads --native -f raw -o "$OUT/model.txt" &
wait "$threads" %4 %5 2>/dev/null; sleep 1
wait "$load"; tail -2 "$OUT/load.log"
kill -INT "$pid"; wait "$pid"
python3 -m benchmarks.pyspy_summary "$OUT/ingress.txt" "$OUT/model.txt" --top 30 > "$OUT/profile-$s.txt"
cat "$OUT/threads-$s.txt" "$OUT/top-$s.txt" >> "$OUT/profile-$s.txt"; tail -3 "$OUT/load.log" >> "$OUT/profile-$s.txt"
rm -f "$OUT/ingress.txt" "$OUT/model.txt" "$OUT/top-$s.txt" "$OUT/threads-$s.txt" "$OUT/load.log"
