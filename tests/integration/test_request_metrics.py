"""Request metrics after real requests: Ray's Prometheus endpoint, scraped and parsed."""

from __future__ import annotations

import time

import requests

from mpsserve.demo import make_request
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL
from tests.integration.conftest import METRICS_PORT
from tests.integration.test_metrics_export import scrape, value_of

REQUESTS = "ray_mpsserve_requests_total"
REPORT_INTERVAL_S = 10.0


def _count(labels: dict[str, str]) -> float:
    return value_of(scrape(METRICS_PORT), REQUESTS, labels) or 0.0


def _settled(labels: dict[str, str], deadline_s: float = 60.0) -> float:
    """The count once Ray has exported everything earlier tests sent: equal across one
    report interval (Ray exports every 10 s by default)."""
    deadline = time.monotonic() + deadline_s
    value = _count(labels)
    while True:
        time.sleep(REPORT_INTERVAL_S + 1)
        again = _count(labels)
        if again == value or time.monotonic() > deadline:
            return again
        value = again


def _wait_for(labels: dict[str, str], want: float, deadline_s: float = 40.0) -> float:
    deadline = time.monotonic() + deadline_s
    while True:  # Ray's agent exports every few seconds
        got = _count(labels)
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(1)


def test_counts_match_what_the_client_sent(base_url: str) -> None:
    ok = {"model": "rec", "version": "1", "protocol": "http", "status": "200"}
    bad = {"model": "rec", "protocol": "http", "status": "400"}
    before_ok, before_bad = _settled(ok), _settled(bad)
    body = encode_json_request(make_request(SMALL, rows=8, seed=5))
    for _ in range(5):
        response = requests.post(f"{base_url}/v2/models/rec/infer", data=body, timeout=60)
        assert response.status_code == 200
    for _ in range(2):
        response = requests.post(f"{base_url}/v2/models/rec/infer", data=b"{}", timeout=60)
        assert response.status_code == 400
    assert _wait_for(ok, before_ok + 5) == before_ok + 5
    assert _wait_for(bad, before_bad + 2) == before_bad + 2
    samples = scrape(METRICS_PORT)
    rows = value_of(samples, "ray_mpsserve_rows_total", {"model": "rec", "version": "1"})
    assert rows is not None and rows >= 5 * 8
    served = value_of(samples, "ray_mpsserve_served_version", {"model": "rec", "version": "1"})
    assert served is not None and served >= 1
    infer = value_of(
        samples, "ray_mpsserve_inference_duration_seconds_count", {"model": "rec", "version": "1"}
    )
    assert infer is not None and infer >= 5
