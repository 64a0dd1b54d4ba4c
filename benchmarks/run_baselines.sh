#!/usr/bin/env bash
# The two reference points, measured in the same session as mpsserve's own run: the in-process
# ceiling (no serving path) and plain Ray Serve through its default HTTP proxy, each with and
# without MPS, 8 processes / replicas. Needs the project's shared perf/ scripts copied to
# .gpu/perf (they are not part of this repository). Results: $OUT/baselines.jsonl
set -uo pipefail
OUT=${OUT:-/tmp/mpsserve-bench-out}; PERF=${PERF:-.gpu/perf}; P=/tmp/mpsserve-baseline-mps
mkdir -p "$OUT" "$P/pipe" "$P/log"
export RAY_AUTH_MODE=disabled
CUDA_MPS_PIPE_DIRECTORY=/nonexistent/no-mps python3 "$PERF/ceiling_probe.py" --label ceiling-no-mps \
  --workers 8 --seconds 8 | tee -a "$OUT/baselines.jsonl"
CUDA_MPS_PIPE_DIRECTORY=$P/pipe CUDA_MPS_LOG_DIRECTORY=$P/log nvidia-cuda-mps-control -d
CUDA_MPS_PIPE_DIRECTORY=$P/pipe python3 "$PERF/ceiling_probe.py" --label ceiling-mps \
  --workers 8 --seconds 8 | tee -a "$OUT/baselines.jsonl"
ray start --head --num-cpus 16 --disable-usage-stats --include-dashboard=false > "$OUT/ray-start.log" 2>&1
python3 "$PERF/rayserve_baseline.py" --label rayserve-default-proxy-no-mps --replicas 8 --conc 32 \
  --seconds 10 | tee -a "$OUT/baselines.jsonl"
python3 "$PERF/rayserve_baseline.py" --label rayserve-default-proxy-mps --replicas 8 --conc 32 \
  --seconds 10 --mps-pipe "$P/pipe" | tee -a "$OUT/baselines.jsonl"
ray stop --force > /dev/null 2>&1
echo quit | CUDA_MPS_PIPE_DIRECTORY=$P/pipe nvidia-cuda-mps-control
