#!/usr/bin/env bash
# On a GPU host: the physical-machine route of docs/deployment.md, end to end with the real MPS
# daemon. `ray start` with the launcher's start hook (the daemon must be up before the raylet),
# `mpsserve deploy` of a Serve config generated from deployments/gpu-mps.yaml (torch runtime and
# a local store: the host has no TensorFlow), the daemon's clients, then a redeploy (replicas
# per GPU 8 -> 4, version 1 pinned) through `ray job submit` when the dashboard starts (else
# `python -m mpsserve.ops.redeploy` directly) while a client sends requests. Results land in $OUT.
#   usage: tests/gpu/deploy_on_gpu_host.sh   (repo root; PYTHONPATH/PATH holding Ray)
set -uo pipefail
OUT=${OUT:-/tmp/mpsserve-deploy-out}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/mpsdep.XXXX)
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
PIPE=/tmp/mpsserve/mps-pipe
log() { echo "--- $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader \
  | tee "$OUT/summary.txt"
python3 -m mpsserve.ops.cli demo-model --out "$work/models/rec" --format torch --version 1 >/dev/null
python3 -m mpsserve.ops.cli demo-model --out "$work/models/rec" --format torch --version 2 --seed 1 >/dev/null
python3 - "$work" <<'PY'
import sys, yaml
work = sys.argv[1]
body = yaml.safe_load(open("deployments/gpu-mps.yaml"))
body["models"][0].update(store=f"{work}/models/rec", runtime="torch", max_rows=4096)
yaml.safe_dump(body, open(f"{work}/v1.service.yaml", "w"))
body["models"][0]["placement"]["replicas_per_gpu"] = 4
body["models"][0]["version_policy"] = {"specific": [1]}
yaml.safe_dump(body, open(f"{work}/v2.service.yaml", "w"))
PY
mkdir -p "$work/job"
python3 -m mpsserve.ops.cli serve-config --config "$work/v1.service.yaml" > "$work/v1.yaml"
python3 -m mpsserve.ops.cli serve-config --config "$work/v2.service.yaml" > "$work/job/v2.yaml"

log "doctor before ray start"
python3 -m mpsserve.ops.cli doctor --config deployments/gpu-mps.yaml 2>&1 | tail -2 | tee -a "$OUT/summary.txt"

log "ray start with the launcher's hook (single node: head and GPU node)"
start_ray() {
  RAY_START_HOOK=mpsserve.node.hook.ray_start_hook \
  MPSSERVE_MPS_CONFIG="{\"mps\": {\"mode\": \"on\", \"pipe_dir\": \"$PIPE\"}}" \
    ray start --head --port=36379 --num-cpus=16 --dashboard-host=127.0.0.1 \
      --dashboard-port=38265 --disable-usage-stats "$@" >> "$OUT/ray-start.txt" 2>&1
}
start_ray --include-dashboard=true
code=$?
if [ $code -ne 0 ]; then  # the offline bundle may lack the dashboard's dependencies
  ray stop >/dev/null 2>&1
  start_ray --include-dashboard=false
  code=$?
fi
echo "ray start exit code: $code" | tee -a "$OUT/summary.txt"
grep -i "mps\|hook" "$OUT/ray-start.txt" | head -5 | tee -a "$OUT/summary.txt"
daemon=$(cat $PIPE/nvidia-cuda-mps-control.pid 2>/dev/null)
raylet=$(pgrep -f '/raylet ' | head -1)
ticks() { awk '{print $22}' "/proc/$1/stat"; }
echo "daemon pid ${daemon:-none} started at tick $(ticks "$daemon" 2>/dev/null);" \
  "raylet pid ${raylet:-none} at tick $(ticks "$raylet" 2>/dev/null)" | tee -a "$OUT/summary.txt"
python3 -m mpsserve.ops.cli doctor --config deployments/gpu-mps.yaml 2>&1 | tail -1 | tee -a "$OUT/summary.txt"

log "mpsserve deploy --config v1.yaml (a Serve config file)"
python3 -m mpsserve.ops.cli deploy --config "$work/v1.yaml" --address 127.0.0.1:36379 \
  > "$OUT/deploy.txt" 2>&1
echo "deploy exit code: $?" | tee -a "$OUT/summary.txt"
tail -2 "$OUT/deploy.txt" | tee -a "$OUT/summary.txt"
python3 -m mpsserve.ops.cli doctor --config deployments/gpu-mps.yaml 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
curl -s localhost:8000/v2/models/rec | python3 -c \
  "import json,sys; m=json.load(sys.stdin); print('served', m.get('versions'), 'mps', json.dumps(m.get('mps'))[:300])" \
  | tee -a "$OUT/summary.txt"

log "redeploy under load"
python3 - "$work" > "$OUT/load.txt" 2>&1 <<'PY' &
import json, sys, time, urllib.request
from mpsserve.ops.demo import DemoSpec, make_request
from mpsserve.protocol.kserve import encode_json_request
body = encode_json_request(make_request(DemoSpec(), rows=100, seed=3))
stop_file, outcomes = f"{sys.argv[1]}/stop", []
import os
while not os.path.exists(stop_file):
    request = urllib.request.Request("http://127.0.0.1:8000/v2/models/rec/infer", data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            outcomes.append(str(json.loads(response.read())["model_version"]))
    except Exception as exc:
        outcomes.append(f"error {exc}")
    time.sleep(0.01)
failed = [o for o in outcomes if not o.isdigit()]
runs = [o for i, o in enumerate(outcomes) if i == 0 or outcomes[i - 1] != o]
print(f"requests {len(outcomes)}, failed {len(failed)}, last 50 all version 1: "
      f"{set(outcomes[-50:]) == {'1'}}, version runs: {len(runs)}, first failures: {failed[:3]}")
PY
load=$!
sleep 10
if curl -sf http://127.0.0.1:38265/api/version >/dev/null; then
  ray job submit --address http://127.0.0.1:38265 --working-dir "$work/job" \
    -- python3 -m mpsserve.ops.redeploy --config v2.yaml > "$OUT/job.txt" 2>&1
  echo "ray job submit exit code: $?" | tee -a "$OUT/summary.txt"
else
  echo "no dashboard here: python -m mpsserve.ops.redeploy directly" | tee -a "$OUT/summary.txt"
  python3 -m mpsserve.ops.redeploy --config "$work/job/v2.yaml" --address 127.0.0.1:36379 \
    > "$OUT/job.txt" 2>&1
  echo "redeploy exit code: $?" | tee -a "$OUT/summary.txt"
fi
sed -n "/^changes to application/,/^deploying/p" "$OUT/job.txt" | tee -a "$OUT/summary.txt"
grep -A6 "^now live" "$OUT/job.txt" | tee -a "$OUT/summary.txt"
sleep 5
touch "$work/stop"; wait $load
tee -a "$OUT/summary.txt" < "$OUT/load.txt"
python3 -m mpsserve.ops.cli doctor --config deployments/gpu-mps.yaml 2>&1 | tail -1 | tee -a "$OUT/summary.txt"

log "stop"
ray stop > /dev/null 2>&1
echo quit | CUDA_MPS_PIPE_DIRECTORY=$PIPE nvidia-cuda-mps-control
sleep 1
echo "daemon after quit: $(cat $PIPE/nvidia-cuda-mps-control.pid 2>/dev/null || echo gone)" \
  | tee -a "$OUT/summary.txt"
