"""The ingress's metrics port on the session's service (a real Ray, its real metrics agent):
``GET /metrics`` answers the service's series, the same from every ingress replica sharing
the port, the ingress says where it is, and a real Prometheus that reads the targets file
`mpsserve serve` writes, through the shipped deployments/prometheus/prometheus.yml, scrapes it
and answers every query of the Grafana dashboard after some traffic."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from mpsserve.ingress.metrics_port import SERVE_PREFIX, SERVICE_PREFIX
from mpsserve.ops.cluster import write_discovery
from mpsserve.ops.demo import make_request
from mpsserve.ops.status import ingress_entries, metrics_targets
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL
from tests.integration.conftest import INGRESS_METRICS_PORT, METRICS_PORT
from tests.integration.test_metrics_export import (
    Sample,
    free_port,
    prometheus_query,
    scrape,
    value_of,
)
from tests.observability import PROMETHEUS_YML, dashboard_exprs, find, reaches, running_prometheus

REQUESTS = "ray_mpsserve_requests_total"
SERVE_REQUESTS = "ray_serve_deployment_request_counter_total"
REC = {"model": "rec"}
SERVE_REC = {"deployment": "model-rec", "application": "mpsserve", "route": "/infer"}
#: Series recorded only on events a healthy CPU service does not have (a stalled attempt, a
#: failed load, a swap, ops on the CPU of a GPU model), or only on a GPU node (MPS, NVML): the
#: dashboard's queries of them run, and may answer nothing here.
EVENT_OR_GPU = (
    "stalled_attempts",
    "load_failures",
    "swaps",
    "model_cpu_ops",
    "mps_",
    "gpu_",
    "serve_deployment_error_counter",
    "embedding_",  # split models only (tests/integration/test_split_model.py serves one)
)


def send(base_url: str, count: int) -> None:
    body = encode_json_request(make_request(SMALL, rows=16, seed=3))
    for _ in range(count):
        answer = requests.post(f"{base_url}/v2/models/rec/infer", data=body, timeout=60)
        assert answer.status_code == 200, answer.text


def ours() -> list[Sample]:
    return scrape(INGRESS_METRICS_PORT)


def waited(read: Callable[[], float | None], deadline_s: float = 60.0) -> float:
    """``read()`` once it is above 0 (Ray exports every 10 s), or 0 at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = read() or 0.0
        if value > 0 or time.monotonic() > deadline:
            return value
        time.sleep(1)


def test_the_metrics_port_serves_the_services_series_and_nothing_else(base_url: str) -> None:
    send(base_url, 4)
    assert reaches(lambda: value_of(ours(), REQUESTS, REC) or 0.0, 4) >= 4
    assert reaches(lambda: value_of(ours(), SERVE_REQUESTS, SERVE_REC) or 0.0, 4) >= 4
    samples = ours()
    assert all(s.name.startswith((SERVICE_PREFIX, SERVE_PREFIX)) for s in samples)
    serve = [s for s in samples if s.name.startswith(SERVE_PREFIX)]
    assert serve and {s.labels.get("application") for s in serve} == {"mpsserve"}
    # Ray's own series are on the agent's port, not here; ours are the same series there.
    ray = scrape(METRICS_PORT)
    assert any(s.name.startswith("ray_node_") for s in ray)
    assert not any(s.name.startswith("ray_node_") for s in samples)
    for _ in range(5):  # two scrapes: a series may appear between them, so look again
        keys = {(s.name, tuple(sorted(s.labels.items()))) for s in samples if s.name == REQUESTS}
        ray_keys = {(s.name, tuple(sorted(s.labels.items()))) for s in ray if s.name == REQUESTS}
        if keys == ray_keys:
            break
        time.sleep(1)
        samples, ray = ours(), scrape(METRICS_PORT)
    assert keys == ray_keys


def test_every_ingress_replica_on_the_port_answers_the_same(base_url: str) -> None:
    """New connections spread over the ingress replicas (SO_REUSEPORT); each reads the node's
    agent, so each answer holds the same series."""
    waited(lambda: value_of(ours(), REQUESTS, REC))
    seen = set()
    for _ in range(8):
        with requests.Session() as session:  # a connection of its own
            answer = session.get(f"http://127.0.0.1:{INGRESS_METRICS_PORT}/metrics", timeout=30)
        assert answer.status_code == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        names = {line.split("{")[0] for line in answer.text.splitlines() if line[:1] != "#"}
        seen.add(REQUESTS in names and "ray_mpsserve_served_version" in names)
    assert seen == {True}
    other = requests.get(f"http://127.0.0.1:{INGRESS_METRICS_PORT}/v2/health/ready", timeout=30)
    assert other.status_code == 404  # the API is on its own port


def test_the_ingress_says_where_its_metrics_port_is(base_url: str) -> None:
    entries = ingress_entries("mpsserve")
    assert len(entries) >= 2 and all(e["metrics_port"] == INGRESS_METRICS_PORT for e in entries)
    assert metrics_targets(entries) == [f"127.0.0.1:{INGRESS_METRICS_PORT}"]  # one per node


@pytest.fixture
def prometheus(base_url: str, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on the shipped config, put in the state dir as the README says,
    reading the targets file written as `mpsserve serve` writes it."""
    binary = find()
    if binary is None:
        pytest.skip("no prometheus binary: set MPSSERVE_PROMETHEUS_BIN or run `make` (installs it)")
    targets = write_discovery("mpsserve", metrics_targets(ingress_entries("mpsserve")))
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["refresh_interval"] = "1s"
    config_file = targets.parent.parent / "prometheus.yml"  # the state dir
    config_file.write_text(yaml.safe_dump(config))
    try:
        with running_prometheus(binary, config_file, tmp_path, free_port()) as url:
            yield url
    finally:
        config_file.unlink()


def results(base: str, query: str) -> list[dict[str, Any]]:
    answer = prometheus_query(base, query)
    assert answer["status"] == "success", f"{query}: {answer.get('error')}"
    return list(answer["data"]["result"])


def test_prometheus_scrapes_the_port_and_every_dashboard_query_answers(
    base_url: str, prometheus: str
) -> None:
    up = 'up{job="mpsserve",app="mpsserve"}'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # Prometheus still starting
            if [r["value"][1] for r in results(prometheus, up)] == ["1"]:
                break
        time.sleep(0.5)
    assert [r["value"][1] for r in results(prometheus, up)] == ["1"]
    # traffic over a few scrapes, so that rates have two points at least
    for _ in range(6):
        send(base_url, 3)
        time.sleep(1)
    total = f'sum({REQUESTS}{{app="mpsserve",model="rec"}})'
    assert waited(lambda: _scalar(prometheus, total)) > 0
    time.sleep(12)  # one more of Ray's report intervals: the last requests' series, twice
    empty = []
    for expr in dashboard_exprs():
        concrete = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
        concrete = concrete.replace("$node", ".*")
        if not results(prometheus, concrete):
            empty.append(expr)
    print(f"{len(empty)} of {len(dashboard_exprs())} dashboard queries empty here:", *empty)
    unexpected = [e for e in empty if not any(part in e for part in EVENT_OR_GPU)]
    assert not unexpected, "dashboard queries without data after traffic:\n" + "\n".join(unexpected)


def _scalar(base: str, query: str) -> float:
    found = results(base, query)
    return float(found[0]["value"][1]) if found else 0.0
