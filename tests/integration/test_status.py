"""``mpsserve status`` and the access log, against the session's deployed app."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import requests

from mpsserve.ops.demo import make_request
from mpsserve.ops.status import gather, render
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL


def _send(base_url: str, request_id: str) -> requests.Response:
    body = encode_json_request(make_request(SMALL, rows=16, seed=3))
    return requests.post(
        f"{base_url}/v2/models/rec/infer",
        data=body,
        headers={"Content-Type": "application/json", "X-Request-ID": request_id},
        timeout=60,
    )


def test_status_sees_every_replica_and_the_traffic(base_url: str) -> None:
    for i in range(3):
        assert _send(base_url, f"status-{i}").status_code == 200
    deadline = time.monotonic() + 15
    while True:  # ingresses report their figures with each directory heartbeat (2 s)
        report = gather("mpsserve")
        recent = [i["recent"]["requests"] for i in report.get("ingresses", [])]
        if sum(recent) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert report["ok"], report["verdict"]
    assert report["applications"]["mpsserve"]["status"] == "RUNNING"
    [replica] = report["replicas"]
    assert replica["model"] == "rec" and replica["versions"] == ["1"]
    assert replica["mps"]["mode"] == "off" and replica["device"] == "cpu"
    assert len(report["ingresses"]) == 2  # the default: no single point of failure
    assert sum(i["recent"]["requests"] for i in report["ingresses"]) >= 3
    assert report["traffic"]["worst_p99_ms"] > 0
    assert report["models"]["rec"] == {
        "embeddings": {},  # a split model's embedding versions (test_split_model.py)
        "serving": {"1": 1},
        "split": False,
        "split_s": None,
        "bound_s": replica["store"]["converge_within_s"],
        "failed": {},
    }
    assert replica["store"]["serving_since"] <= report["time"]
    screen = render(report)
    assert "OK: 1 model replica(s) answer, MPS off" in screen
    assert "versions of rec: 1 on 1 replica(s)" in screen
    assert json.loads(json.dumps(report, default=str))["app"] == "mpsserve"


def test_access_log_line_per_request_with_the_clients_id(base_url: str) -> None:
    import ray

    response = _send(base_url, "access-log-42")
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "access-log-42"
    generated = _send(base_url, "")  # no id from the client: one is made and echoed
    assert len(generated.headers["X-Request-ID"]) == 16
    node = ray._private.worker._global_node
    assert node is not None  # the session fixture started Ray in this process
    logs = Path(node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 10
    while True:
        lines = [
            line
            for path in glob.glob(str(logs / "replica_mpsserve_ingress_*.log"))
            for line in Path(path).read_text().splitlines()
            if "request_id=access-log-42 " in line
        ]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    [line] = lines
    for field in ("model=rec", "version=1", "protocol=http", "rows=16", "status=200"):
        assert field in line
    assert float(line.rsplit("latency_ms=", 1)[1].split()[0]) > 0
