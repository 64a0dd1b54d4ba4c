#!/usr/bin/env bash
# Issue 20 on the GPU host, first part: what a CUDA context costs with and without MPS and
# whether a client's pinned memory limit holds (context_cost.py), the 49th replica refused at
# config load, then 24 and 48 replicas per GPU starting together (many_replicas_on_gpu_host.sh).
#   usage (GPU host, repo root, PYTHONPATH holding Ray): tests/gpu/mps_stress_on_gpu_host.sh
#   env: OUT (/tmp/mpsserve-stress), SIZES ("24 48"), CONTEXT (1: run context_cost.py), MANY_TIMEOUT_S (300)
set -uo pipefail
OUT=${OUT:-/tmp/mpsserve-stress}; SIZES=${SIZES:-24 48}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${CONTEXT:-1}" = 1 ]; then
  timeout 150 python3 tests/gpu/context_cost.py --processes 8 --out "$OUT/context-cost.json" \
    > "$OUT/context-cost.log" 2>&1; echo "context_cost exit $?" | tee -a "$OUT/summary.txt"
fi
python3 - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
from mpsserve.config import ServiceConfig
try:
    ServiceConfig.model_validate({"models": [{"name": "rec", "store": "/m", "runtime": "torch",
        "placement": {"replicas_per_gpu": 49}}], "mps": {"mode": "on"}})
    print("49 replicas per GPU: ACCEPTED (wrong)")
except Exception as exc:
    print("49 replicas per GPU refused at config load:", " ".join(l for l in str(exc).splitlines() if "pydantic.dev" not in l)[:300])
PY
for n in $SIZES; do
  N=$n OUT=$OUT timeout ${MANY_TIMEOUT_S:-300} bash tests/gpu/many_replicas_on_gpu_host.sh > "$OUT/many-$n.log" 2>&1
  echo "N=$n exit $?" | tee -a "$OUT/summary.txt"; cat "$OUT/summary-$n.txt" 2>/dev/null | tee -a "$OUT/summary.txt"
done
