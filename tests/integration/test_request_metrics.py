"""Request metrics after real requests: Ray's Prometheus endpoint, scraped and parsed."""

from __future__ import annotations

import requests

from mpsserve.ops.demo import make_request
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL
from tests.integration.conftest import METRICS_PORT
from tests.integration.test_metrics_export import scrape, value_of
from tests.observability import reaches, settled

REQUESTS = "ray_mpsserve_requests_total"


def _count(labels: dict[str, str]) -> float:
    return value_of(scrape(METRICS_PORT), REQUESTS, labels) or 0.0


def test_counts_match_what_the_client_sent(base_url: str) -> None:
    ok = {"model": "rec", "version": "1", "protocol": "http", "status": "200"}
    bad = {"model": "rec", "protocol": "http", "status": "400"}
    before_ok, before_bad = settled(lambda: _count(ok)), settled(lambda: _count(bad))
    body = encode_json_request(make_request(SMALL, rows=8, seed=5))
    for _ in range(5):
        response = requests.post(f"{base_url}/v2/models/rec/infer", data=body, timeout=60)
        assert response.status_code == 200
    for _ in range(2):
        response = requests.post(f"{base_url}/v2/models/rec/infer", data=b"{}", timeout=60)
        assert response.status_code == 400
    assert reaches(lambda: _count(ok), before_ok + 5) == before_ok + 5
    assert reaches(lambda: _count(bad), before_bad + 2) == before_bad + 2
    samples = scrape(METRICS_PORT)
    rows = value_of(samples, "ray_mpsserve_rows_total", {"model": "rec", "version": "1"})
    assert rows is not None and rows >= 5 * 8
    served = value_of(samples, "ray_mpsserve_served_version", {"model": "rec", "version": "1"})
    assert served is not None and served >= 1
    infer = value_of(
        samples, "ray_mpsserve_inference_duration_seconds_count", {"model": "rec", "version": "1"}
    )
    assert infer is not None and infer >= 5
