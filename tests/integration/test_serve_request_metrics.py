"""Frames served on the data port show up in Ray Serve's own request metrics, per deployment
and replica, as the Ray dashboard's Serve views read them (Ray's Prometheus endpoint, scraped).
"""

from __future__ import annotations

import requests

from mpsserve.ops.demo import make_request
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL
from tests.integration.conftest import METRICS_PORT
from tests.integration.test_metrics_export import Sample, scrape, value_of
from tests.observability import reaches, settled

REQUESTS = "ray_serve_deployment_request_counter_total"
LATENCY_COUNT = "ray_serve_deployment_processing_latency_ms_count"
INFER = {"deployment": "model-rec", "application": "mpsserve", "route": "/infer"}


def _count(name: str) -> float:
    return value_of(scrape(METRICS_PORT), name, INFER) or 0.0


def _series(samples: list[Sample], name: str) -> list[Sample]:
    return [s for s in samples if s.name == name and s.labels.get("deployment") == "model-rec"]


def test_serve_counts_the_frames_per_deployment_and_replica(base_url: str) -> None:
    before = settled(lambda: _count(REQUESTS))
    latency_before = _count(LATENCY_COUNT)
    body = encode_json_request(make_request(SMALL, rows=8, seed=7))
    sent = 6
    for _ in range(sent):
        response = requests.post(f"{base_url}/v2/models/rec/infer", data=body, timeout=60)
        assert response.status_code == 200
    assert reaches(lambda: _count(REQUESTS), before + sent) == before + sent
    assert reaches(lambda: _count(LATENCY_COUNT), latency_before + sent) >= latency_before + sent
    samples = scrape(METRICS_PORT)
    ours = _series(samples, REQUESTS)
    # Serve's labels, as its own records carry them: one series per replica and route.
    assert ours and all(s.labels["replica"] for s in ours)
    assert {s.labels["application"] for s in ours} == {"mpsserve"}
    # The ingress deployment's Serve-side counts are Serve's own and stay apart.
    ingress = [s for s in samples if s.name == REQUESTS and s.labels.get("deployment") == "ingress"]
    assert all(s.labels.get("route") != "/infer" for s in ingress)
