#!/usr/bin/env bash
# Same-run A/B of the serving path on the GPU host: an older tree (BASE: a commit unpacked with
# `git archive`) and this tree take turns, each through its own benchmarks/run_gpu.sh SCENARIO
# (serve, benchmarks.loadgen over HTTP and gRPC, stop), ROUNDS times, so drift hits both sides.
#   usage (repo root, bundle on PYTHONPATH's first entry /tmp/site):
#     BASE=.gpu/base SCENARIO=mps ROUNDS=2 CONC=32 DUR=10 benchmarks/ab_on_gpu_host.sh
#   prints one line per protocol and concurrency: (req/s, P99 ms, errors) per round and side,
#   and the ratio of the medians new/base.
set -uo pipefail
BASE=$(cd "${BASE:?set BASE to the unpacked older tree}" && pwd); NEW=$PWD
SCENARIO=${SCENARIO:-mps}; ROUNDS=${ROUNDS:-2}; OUT=${OUT:-/tmp/mpsserve-ab}
export CONC=${CONC:-32} DUR=${DUR:-10}
mkdir -p "$OUT"
for round in $(seq "$ROUNDS"); do
  for side in base new; do
    tree=$NEW; [ "$side" = base ] && tree=$BASE
    echo "round $round: $side ($tree)"
    (cd "$tree" && PYTHONPATH="/tmp/site:$tree" OUT="$OUT/$side-$round" \
      bash benchmarks/run_gpu.sh "$SCENARIO" > "$OUT/$side-$round.log" 2>&1)
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
def rows(side):
    found = {}
    for r in range(1, rounds + 1):
        path = out / f"{side}-{r}" / "results.json"
        if not path.exists():
            continue
        for row in json.loads(path.read_text()).get("steps", []):
            key = (row.get("protocol"), row.get("concurrency"))
            found.setdefault(key, []).append((row.get("qps"), row.get("p99_ms"), row.get("errors")))
    return found
base, new = rows("base"), rows("new")
for key in sorted(set(base) | set(new), key=str):
    b, n = base.get(key, []), new.get(key, [])
    mb = statistics.median(x[0] for x in b) if b else None
    mn = statistics.median(x[0] for x in n) if n else None
    ratio = f"{mn / mb:.3f}" if mb and mn else "-"
    print(f"{key}: base {b} new {n} -> median req/s base {mb} new {mn}, new/base {ratio}")
PY
