#!/usr/bin/env bash
# The CUDA-graph ceiling and mpsserve in one run on the GPU host, and mpsserve's ratio to it.
# First the ceiling (benchmarks/ceiling/, no serving path) under an MPS daemon of its own, with
# a spinning and a blocking wait for the GPU; then each scenario through benchmarks/run_gpu.sh
# (serve, benchmarks.loadgen over HTTP and gRPC, stop); then one summary: req/s, P99, CPU
# per request (whole machine and per role) and each step's share of the best ceiling.
#   usage (repo root, PYTHONPATH holding Ray): benchmarks/ceiling_and_service.sh [SCENARIO ...]
#   env: OUT, WORKERS (ceiling processes; the scenario's replica count, default 8),
#        CEILING_S (seconds per ceiling run, default 8), and run_gpu.sh's CONC, DUR, PROCS, PROTOS
set -uo pipefail
OUT=${OUT:-/tmp/mpsserve-ceiling}; WORKERS=${WORKERS:-8}; CEILING_S=${CEILING_S:-8}
mkdir -p "$OUT"
mps=$(mktemp -d)
mkdir -p "$mps/pipe" "$mps/log"
(
  export CUDA_MPS_PIPE_DIRECTORY=$mps/pipe CUDA_MPS_LOG_DIRECTORY=$mps/log
  nvidia-cuda-mps-control -d
  for wait in spin blocking; do
    flag=(); [ "$wait" = blocking ] && flag=(--blocking)
    (cd benchmarks/ceiling && python3 ceiling_graphs.py --label "ceiling-$wait" \
      --workers "$WORKERS" --seconds "$CEILING_S" "${flag[@]}") | tee -a "$OUT/ceiling.jsonl"
  done
  echo quit | nvidia-cuda-mps-control  # ours only: the service starts its own daemon
)
OUT=$OUT bash benchmarks/run_gpu.sh "${@:-mps}" > "$OUT/service.log" 2>&1
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ceiling = [json.loads(l) for l in (out / "ceiling.jsonl").read_text().splitlines() if l.strip()]
steps = json.loads((out / "results.json").read_text()).get("steps", []) if (out / "results.json").exists() else []
best = max((c["qps"] for c in ceiling), default=None)
ms = lambda s: "n/a" if s is None else f"{1000 * s:.2f}"
print("| run | req/s | of ceiling | P99 ms | CPU ms/req (machine) | model | ingress | errors |")
print("|---|---|---|---|---|---|---|---|")
for c in ceiling:
    print(f"| {c['label']} ({c['workers']} processes) | {c['qps']} | {c['qps'] / best:.2f} | {c['p99_ms']} | {c['cpu_ms_per_req']} (workers only) | | | 0 |")
for s in steps:
    roles = s.get("role_cpu_s_per_req") or {}
    share = f"{s['qps'] / best:.2f}" if best else "n/a"
    print(f"| mpsserve {s['label']} {s['protocol']} c={s['concurrency']} | {s['qps']} | {share} | {s['p99_ms']} "
          f"| {ms(s.get('machine_cpu_s_per_req'))} | {ms(roles.get('model'))} | {ms(roles.get('ingress'))} | {s['errors']} |")
PY
