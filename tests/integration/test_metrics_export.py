"""mpsserve's metrics through Ray's real metrics export, then through a real Prometheus.

Ray runs in a subprocess of its own (this file, run as a script): the session's Ray
(conftest.py) has no fixed metrics port and a process holds one Ray, so this test neither
needs nor disturbs it. An actor there records known values through mpsserve.metrics (and the
node sampler, from a guardian state file); the test scrapes the node's metrics export port,
parses the Prometheus text and compares. A real Prometheus, where one is installed, scrapes
the same port as the whole-Ray option of deployments/prometheus/prometheus.yml does and runs
every dashboard query.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpsserve import metrics
from tests.observability import PROMETHEUS_YML, ROOT, dashboard_exprs, find, running_prometheus

NODE = "test-node"
REPORT_INTERVAL_MS = 1000  # Ray's metrics report interval in the test's Ray (10 s by default)
GAUGE_TTL_S = 2 * REPORT_INTERVAL_MS / 1000
#: (exported sample name, labels it must have, value). ``le`` compares as a number.
EXPECTED: list[tuple[str, dict[str, str], float]] = [
    ("ray_mpsserve_requests_total", {"protocol": "http", "status": "ok", "version": "1"}, 3),
    ("ray_mpsserve_requests_total", {"protocol": "grpc", "status": "invalid"}, 1),
    ("ray_mpsserve_rows_total", {"model": "rec", "version": "1"}, 3 * 2000 + 10),
    ("ray_mpsserve_request_duration_seconds_count", {"protocol": "http"}, 3),
    ("ray_mpsserve_request_duration_seconds_bucket", {"protocol": "http", "le": "0.003"}, 0),
    ("ray_mpsserve_request_duration_seconds_bucket", {"protocol": "http", "le": "0.004"}, 3),
    ("ray_mpsserve_request_duration_seconds_bucket", {"protocol": "grpc", "le": "0.15"}, 0),
    ("ray_mpsserve_request_duration_seconds_bucket", {"protocol": "grpc", "le": "0.25"}, 1),
    ("ray_mpsserve_queue_duration_seconds_count", {"model": "rec"}, 2),
    ("ray_mpsserve_inference_duration_seconds_count", {"model": "rec", "version": "1"}, 2),
    ("ray_mpsserve_inference_duration_seconds_bucket", {"le": "0.002"}, 0),
    ("ray_mpsserve_inference_duration_seconds_bucket", {"le": "0.003"}, 2),
    ("ray_mpsserve_stalled_attempts_total", {"model": "rec", "replica": "r1"}, 1),
    ("ray_mpsserve_requests_in_flight", {"model": "rec"}, 2),
    ("ray_mpsserve_served_version", {"replica": "r1", "version": "1"}, 0),
    ("ray_mpsserve_served_version", {"replica": "r1", "version": "2"}, 1),
    ("ray_mpsserve_load_failures_total", {"model": "rec", "version": "3"}, 1),
    ("ray_mpsserve_swaps_total", {"model": "rec", "version": "2"}, 1),
    ("ray_mpsserve_model_cpu_ops", {"model": "rec", "version": "2"}, 4),
    ("ray_mpsserve_mps_daemon_up", {"node": NODE}, 1),
    ("ray_mpsserve_mps_daemon_restarts_total", {"node": NODE}, 2),
    ("ray_mpsserve_mps_clients", {"node": NODE, "gpu": "all"}, 3),
    ("ray_mpsserve_warmup_requests_total", {"version": "2", "source": "file"}, 3),
    ("ray_mpsserve_warmup_seconds_total", {"version": "2", "source": "file"}, 0.5),
    ("ray_mpsserve_embedding_ids_total", {"table": "cat", "level": "requested"}, 200),
    ("ray_mpsserve_embedding_ids_total", {"table": "cat", "level": "node_cache"}, 120),
    ("ray_mpsserve_embedding_ids_total", {"table": "cat", "level": "store"}, 80),
    ("ray_mpsserve_embedding_lookup_duration_seconds_count", {"model": "rec"}, 2),
    ("ray_mpsserve_embedding_store_errors_total", {"model": "rec"}, 1),
]


def record_known_values(state_dir: Path) -> None:
    """What the actor records: the service's calls, and one round of the node sampler."""
    from mpsserve.node.sampler import NodeSampler
    from mpsserve.node.state import NodeState, write_state

    for _ in range(3):
        metrics.observe_request("rec", "1", "http", "ok", rows=2000, seconds=0.0034)
    metrics.observe_request("rec", "1", "grpc", "invalid", rows=10, seconds=0.2)
    for _ in range(2):
        metrics.observe_inference("rec", "1", queue_seconds=0.0005, inference_seconds=0.0021)
    metrics.count_stalled_attempt("rec", "r1")
    for delta in (1, 1, 1, -1):
        metrics.add_in_flight("rec", delta)
    metrics.set_served_versions("rec", "r1", ["1"])
    metrics.set_served_versions("rec", "r1", ["2"])
    metrics.count_load_failure("rec", "3")
    metrics.count_swap("rec", "2")
    metrics.set_cpu_ops("rec", "2", 4)
    metrics.observe_warmup("rec", "2", "file", 3, 0.5)
    for _ in range(2):
        metrics.observe_embedding_lookup("rec", 0.004, {"cat": (100, 60, 40)})
    metrics.count_embedding_store_error("rec")
    metrics.flush_counts()  # the summed counts, as a replica's health check flushes them
    servers = {"100": [11, 12, 13]}
    write_state(state_dir, NodeState(node=NODE, up=True, restarts=2, servers=servers))
    NodeSampler(state_dir, node=NODE).sample()


def serve_metrics(port: int, state_dir: Path, ready: Path) -> None:
    """The subprocess: a one-CPU Ray exporting on ``port`` until stdin closes."""
    import ray

    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _metrics_export_port=port,
    )

    @ray.remote(num_cpus=0)
    class Recorder:  # an actor: its process (and so its gauges) lives until shutdown
        def record(self, state_dir: str) -> None:
            record_known_values(Path(state_dir))

    recorder = Recorder.remote()  # type: ignore[attr-defined]
    ray.get(recorder.record.remote(str(state_dir)))
    ready.touch()
    sys.stdin.read()
    ray.shutdown()


def free_port() -> int:
    """A port above 30000 that nothing listens on now."""
    for _ in range(200):
        port = random.randint(30000, 32700)
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 30000-32700")


@dataclass
class RayMetrics:
    port: int
    log: Path


@pytest.fixture(scope="module")
def ray_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayMetrics]:
    tmp = tmp_path_factory.mktemp("ray-metrics")
    port, ready, log = free_port(), tmp / "ready", tmp / "ray.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_metrics_report_interval_ms": str(REPORT_INTERVAL_MS),
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(port), str(tmp / "state"), str(ready)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray subprocess did not record its metrics:\n{log.read_text()}")
            time.sleep(0.2)
        yield RayMetrics(port, log)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(port: int) -> list[Sample]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return [
        Sample(s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _matches(sample: Sample, name: str, labels: dict[str, str]) -> bool:
    if sample.name != name:
        return False
    for key, want in labels.items():
        have = sample.labels.get(key)
        if have is None or (float(have) != float(want) if key == "le" else have != want):
            return False
    return True


def value_of(samples: list[Sample], name: str, labels: dict[str, str]) -> float | None:
    """The sum over every series (one per process) with these labels; None when absent."""
    found = [s.value for s in samples if _matches(s, name, labels)]
    return sum(found) if found else None


def mismatches(samples: list[Sample]) -> list[str]:
    wrong = []
    for name, labels, want in EXPECTED:
        have = value_of(samples, name, labels)
        if have != want:
            wrong.append(f"{name}{labels}: {have} != {want}")
    return wrong


def test_rays_export_carries_every_recorded_value(ray_metrics: RayMetrics) -> None:
    deadline, wrong = time.monotonic() + 60, ["not scraped yet"]
    samples: list[Sample] = []
    while wrong and time.monotonic() < deadline:
        try:
            samples = scrape(ray_metrics.port)
            wrong = mismatches(samples)
        except OSError as exc:  # the agent's endpoint not up yet
            wrong = [f"scrape failed: {exc}"]
        if wrong:
            time.sleep(1)
    assert not wrong, "\n".join(wrong)
    # Ray forgets a gauge not set again within two report intervals (2 s here): still there.
    time.sleep(3 * GAUGE_TTL_S)
    samples = scrape(ray_metrics.port)
    assert not mismatches(samples), "\n".join(mismatches(samples))
    ours = {s.name for s in samples if s.name.startswith(metrics.EXPORT_PREFIX + "mpsserve_")}
    assert ours <= metrics.exported_names()
    # Everything recorded is exported; GPU gauges only where NVML sees a GPU.
    gpu_names = {n for spec in metrics.METRICS if "gpu" in spec.tags for n in spec.exported}
    assert metrics.exported_names() - ours <= gpu_names - {"ray_mpsserve_mps_clients"}


def prometheus_query(base: str, query: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # a bad query: 400 with the error in the body
        return json.loads(exc.read())


def scalar(result: dict[str, Any]) -> float | None:
    vector = result.get("data", {}).get("result", [])
    return float(vector[0]["value"][1]) if len(vector) == 1 else None


def prometheus_config(tmp: Path, port: int) -> Path:
    """The shipped config's whole-Ray option (its commented ``ray`` job: Ray's discovery
    file, here listing only our Ray node), scraping every second. The service's own path, the
    ingress's metrics port, is tests/integration/test_metrics_port.py."""
    discovery = tmp / "prom_metrics_service_discovery.json"  # as Ray writes it
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{port}"]}]))
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    assert "# - job_name: ray" in PROMETHEUS_YML.read_text()  # documented there, commented
    sd = {"files": [str(discovery)], "refresh_interval": "1s"}
    config["scrape_configs"] = [{"job_name": "ray", "file_sd_configs": [sd]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus_url(ray_metrics: RayMetrics, tmp_path: Path) -> Iterator[str]:
    binary = find()
    if binary is None:
        pytest.skip("no prometheus binary: set MPSSERVE_PROMETHEUS_BIN or run `make` (installs it)")
    config_file = prometheus_config(tmp_path, ray_metrics.port)
    with running_prometheus(binary, config_file, tmp_path, free_port()) as url:
        yield url


def test_prometheus_scrapes_it_and_the_dashboard_queries_run(prometheus_url: str) -> None:
    query = 'sum(ray_mpsserve_requests_total{model="rec",protocol="http",status="ok"})'
    deadline, value = time.monotonic() + 60, None
    while value != 3 and time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # Prometheus still starting
            value = scalar(prometheus_query(prometheus_url, query))
        if value != 3:
            time.sleep(0.5)
    assert value == 3
    restarts = 'max by (node) (ray_mpsserve_mps_daemon_restarts_total{node="test-node"})'
    assert scalar(prometheus_query(prometheus_url, restarts)) == 2
    # The dashboard's quantile over the exported buckets: 3.4 ms lies in (3 ms, 4 ms].
    p50 = (
        "histogram_quantile(0.5, sum by (le) "
        '(ray_mpsserve_request_duration_seconds_bucket{protocol="http"}))'
    )
    median = scalar(prometheus_query(prometheus_url, p50))
    assert median is not None and 0.003 < median <= 0.004
    for expr in dashboard_exprs():
        concrete = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
        concrete = concrete.replace("$node", ".*")
        answer = prometheus_query(prometheus_url, concrete)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"


if __name__ == "__main__":
    serve_metrics(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
