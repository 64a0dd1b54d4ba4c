#!/usr/bin/env bash
# Same-run A/B(/C) of the serving path on the GPU host: older trees (commits unpacked with
# `git archive`) and this tree take turns, each through its own benchmarks/run_gpu.sh SCENARIO
# (serve, benchmarks.loadgen over HTTP and gRPC, stop), so drift hits every side alike.
#   usage (repo root, bundle on PYTHONPATH's first entry /tmp/site):
#     TREES="base=.gpu/base new=." SCENARIO=mps ROUND=1 CONC=32 DUR=10 benchmarks/ab_on_gpu_host.sh
#   TREES: name=dir pairs, run in that order (the first is the reference); ROUND names this
#   round's result folders, so a second call (another order) adds to the same $OUT. Prints one
#   line per protocol and concurrency: (req/s, P99 ms, errors) per round and side, and each
#   side's median req/s over the reference's.
set -uo pipefail
TREES=${TREES:?name=dir pairs, the reference first}; SCENARIO=${SCENARIO:-mps}
ROUND=${ROUND:-1}; OUT=${OUT:-/tmp/mpsserve-ab}
export CONC=${CONC:-32} DUR=${DUR:-10}
mkdir -p "$OUT"
names=()
for pair in $TREES; do
  side=${pair%%=*}; tree=$(cd "${pair#*=}" && pwd); names+=("$side")
  echo "round $ROUND: $side ($tree)"
  (cd "$tree" && PYTHONPATH="/tmp/site:$tree" OUT="$OUT/$side-$ROUND" \
    bash benchmarks/run_gpu.sh "$SCENARIO" > "$OUT/$side-$ROUND.log" 2>&1)
done
python3 - "$OUT" "${names[@]}" <<'PY'
import json, statistics, sys
from pathlib import Path
out, sides = Path(sys.argv[1]), sys.argv[2:]
def rows(side):
    found = {}
    for path in sorted(out.glob(f"{side}-*/results.json")):
        for row in json.loads(path.read_text()).get("steps", []):
            key = (row.get("protocol"), row.get("concurrency"))
            found.setdefault(key, []).append((row.get("qps"), row.get("p99_ms"), row.get("errors")))
    return found
found = {side: rows(side) for side in sides}
keys = sorted({k for f in found.values() for k in f}, key=str)
for key in keys:
    med = {s: statistics.median(x[0] for x in found[s][key]) for s in sides if found[s].get(key)}
    ref = med.get(sides[0])
    print(f"{key}:")
    for side in sides:
        ratio = f", {med[side] / ref:.3f} of {sides[0]}" if ref and side in med else ""
        print(f"  {side}: {found[side].get(key, [])} median {med.get(side)} req/s{ratio}")
PY
