"""metrics.py and the node sampler without Ray: names, buckets, bookkeeping, the sampler's
reading of the guardian's state, and calm without NVML or Ray. The export through Ray is
tests/integration/test_metrics_export.py."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mpsserve import metrics
from mpsserve.metrics import MetricSpec
from mpsserve.node import gpu
from mpsserve.node.guardian import Guardian
from mpsserve.node.sampler import NodeSampler
from mpsserve.node.state import NodeState, write_state
from tests.mps import daemon, standin_client, standin_control
from tests.unit.conftest import Recorder


class Failing:
    def record(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        raise RuntimeError("metrics agent gone")


def test_names_follow_prometheus_conventions() -> None:
    names = [spec.name for spec in metrics.METRICS]
    assert len(names) == len(set(names))
    for spec in metrics.METRICS:
        assert re.fullmatch(r"mpsserve_[a-z0-9_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds") and spec.buckets == metrics.LATENCY_BUCKETS_S
        assert all(re.fullmatch(r"[a-z_]+", tag) for tag in spec.tags)
    assert "ray_mpsserve_requests_total" in metrics.exported_names()
    assert "ray_mpsserve_request_duration_seconds_bucket" in metrics.exported_names()


def test_latency_buckets_resolve_single_milliseconds() -> None:
    buckets = metrics.LATENCY_BUCKETS_S
    assert list(buckets) == sorted(set(buckets)) and buckets[0] == 0.0005
    assert buckets[-1] == 5.0
    below_6ms = [b for b in buckets if b <= 0.006]
    assert below_6ms == pytest.approx([0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006])
    # A 3.4 ms request and a 4.6 ms one land in different buckets.
    assert next(b for b in buckets if b >= 0.0034) != next(b for b in buckets if b >= 0.0046)


def test_a_request_records_count_rows_and_time(recorder: Recorder) -> None:
    metrics.observe_request("rec", "3", "http", "ok", rows=2000, seconds=0.004)
    metrics.observe_request("rec", "3", "grpc", "invalid", rows=0, seconds=-1.0)
    assert recorder.of("mpsserve_requests_total") == [
        (1, {"model": "rec", "version": "3", "protocol": "http", "status": "ok"}),
        (1, {"model": "rec", "version": "3", "protocol": "grpc", "status": "invalid"}),
    ]
    # No rows, no increment (Ray's counter refuses 0); a clock step back records 0 s.
    assert recorder.of("mpsserve_rows_total") == [(2000, {"model": "rec", "version": "3"})]
    durations = recorder.of("mpsserve_request_duration_seconds")
    assert [value for value, _ in durations] == [0.004, 0.0]
    metrics.observe_inference("rec", "3", queue_seconds=0.001, inference_seconds=0.002)
    assert recorder.of("mpsserve_queue_duration_seconds") == [(0.001, {"model": "rec"})]
    assert recorder.of("mpsserve_inference_duration_seconds") == [
        (0.002, {"model": "rec", "version": "3"})
    ]


def test_in_flight_is_a_process_count_per_model(recorder: Recorder) -> None:
    for model, delta in [("a", 1), ("a", 1), ("b", 1), ("a", -1), ("b", -1), ("b", -1)]:
        metrics.add_in_flight(model, delta)
    values = recorder.of("mpsserve_requests_in_flight")
    assert [(v, t["model"]) for v, t in values] == [
        (1, "a"), (2, "a"), (1, "b"), (1, "a"), (0, "b"), (0, "b"),
    ]  # fmt: skip


def test_a_version_no_longer_served_drops_to_zero(recorder: Recorder) -> None:
    metrics.set_served_versions("rec", "r1", ["1"])
    metrics.set_served_versions("rec", "r2", ["1"])
    metrics.set_served_versions("rec", "r1", ["1", "2"])
    metrics.set_served_versions("rec", "r1", ["2"])

    def latest(replica: str) -> dict[str, float]:
        seen: dict[str, float] = {}
        for value, tags in recorder.of("mpsserve_served_version"):
            if tags["replica"] == replica:
                seen[tags["version"]] = value
        return seen

    assert latest("r1") == {"1": 0, "2": 1}
    assert latest("r2") == {"1": 1}  # another replica's versions are its own
    before = len(recorder.values)
    metrics.set_served_versions("rec", "r1", [])
    assert recorder.values[before:] == [
        ("mpsserve_served_version", 0, {"model": "rec", "replica": "r1", "version": "2"})
    ]


def test_counters_and_cpu_ops(recorder: Recorder) -> None:
    metrics.count_load_failure("rec", "4")
    metrics.count_swap("rec", "5")
    metrics.set_cpu_ops("rec", "5", 3)
    assert recorder.values == [
        ("mpsserve_load_failures_total", 1, {"model": "rec", "version": "4"}),
        ("mpsserve_swaps_total", 1, {"model": "rec", "version": "5"}),
        ("mpsserve_model_cpu_ops", 3, {"model": "rec", "version": "5"}),
    ]


def test_a_failing_backend_never_reaches_the_caller_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    previous = metrics.use_backend(Failing())
    try:
        with caplog.at_level(logging.WARNING, logger="mpsserve.metrics"):
            for _ in range(3):
                metrics.observe_request("rec", "1", "http", "ok", rows=5, seconds=0.01)
                metrics.add_in_flight("rec", 1)
    finally:
        metrics.use_backend(previous)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4  # once per metric: requests, rows, duration, in flight
    assert all("going on without it" in line for line in logged)


def test_without_ray_values_are_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    previous = metrics.use_backend(metrics.RayBackend())
    try:
        with caplog.at_level(logging.INFO, logger="mpsserve.metrics"):
            metrics.observe_request("rec", "1", "http", "ok", rows=5, seconds=0.01)
            metrics.set_served_versions("rec", "r1", ["1"])
    finally:
        metrics.use_backend(previous)
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "not initialized" in caplog.records[0].getMessage()


class FakeRayMetric:
    """Stands in for a ``ray.util.metrics`` object (Ray cannot start in this tier)."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, tags))


def test_ray_backend_sets_gauges_again_so_ray_keeps_them() -> None:
    made: dict[str, FakeRayMetric] = {}

    def make(spec: MetricSpec) -> FakeRayMetric:
        return made.setdefault(spec.name, FakeRayMetric(spec))

    backend = metrics.RayBackend(make=make, connected=lambda: True, refresh_s=0.05)
    previous = metrics.use_backend(backend)
    try:
        metrics.add_in_flight("rec", 1)
        metrics.add_in_flight("rec", 1)
        metrics.set_served_versions("rec", "r1", ["1"])
        metrics.count_swap("rec", "1")
        time.sleep(0.3)
    finally:
        metrics.use_backend(previous)
        backend.close()
    in_flight = made["mpsserve_requests_in_flight"].calls
    assert in_flight[:2] == [("set", 1, {"model": "rec"}), ("set", 2, {"model": "rec"})]
    assert len(in_flight) >= 4  # set again, with the latest value only
    assert all(call == ("set", 2, {"model": "rec"}) for call in in_flight[2:])
    assert len(made["mpsserve_served_version"].calls) >= 3
    assert made["mpsserve_swaps_total"].calls == [("inc", 1, {"model": "rec", "version": "1"})]


def no_nvml() -> gpu.Usage:
    return gpu.Usage(error="NVML unavailable: NVML Shared Library Not Found")


def test_sampler_reads_the_guardian_state(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "usage", no_nvml)
    servers = {"100": [11, 12], "200": [12, 13]}  # a pid twice is one client
    write_state(tmp_path, NodeState(node="n1", up=True, restarts=2, servers=servers))
    sampler = NodeSampler(tmp_path, node="n1")
    first = sampler.sample()
    assert first.mps is not None and first.new_restarts == 2 and first.gpus == []
    assert recorder.of("mpsserve_mps_daemon_up") == [(1, {"node": "n1"})]
    assert recorder.of("mpsserve_mps_clients") == [(3, {"node": "n1", "gpu": "all"})]
    assert recorder.of("mpsserve_mps_daemon_restarts_total") == [(2, {"node": "n1"})]

    write_state(tmp_path, NodeState(node="n1", up=False, restarts=3, last_error="gone"))
    assert sampler.sample().new_restarts == 1
    assert recorder.of("mpsserve_mps_daemon_up")[-1][0] == 0
    assert recorder.of("mpsserve_mps_clients")[-1][0] == 0
    write_state(tmp_path, NodeState(node="n1", up=True, restarts=3))
    assert sampler.sample().new_restarts == 0
    write_state(tmp_path, NodeState(node="n1", up=True, restarts=1))  # state file was reset
    assert sampler.sample().new_restarts == 1
    restarts = [v for v, _ in recorder.of("mpsserve_mps_daemon_restarts_total")]
    assert restarts == [2, 1, 1]  # nothing recorded for a round without restarts


def test_sampler_without_state_says_the_daemon_is_down(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "usage", no_nvml)
    sample = NodeSampler(tmp_path / "missing", node="n1").sample()
    assert sample.mps is None and sample.new_restarts == 0
    assert recorder.of("mpsserve_mps_daemon_up") == [(0, {"node": "n1"})]
    assert recorder.of("mpsserve_mps_daemon_restarts_total") == []


def test_sampler_without_nvml_stops_asking_quietly(
    tmp_path: Path,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def counted() -> gpu.Usage:
        calls.append(1)
        return no_nvml()

    monkeypatch.setattr(gpu, "usage", counted)
    sampler = NodeSampler(None, node="n1")
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert sampler.sample().gpus == []
    assert calls == [1]
    assert recorder.values == [] and caplog.records == []


def test_sampler_on_this_machine_never_raises(tmp_path: Path, recorder: Recorder) -> None:
    """The real NVML: absent on a CPU machine, real GPUs on a GPU host."""
    sample = NodeSampler(tmp_path, node="n1").sample()
    assert len(recorder.of("mpsserve_gpu_memory_total_bytes")) == len(sample.gpus)


class FakeNvml:
    """pynvml's few calls for one board that reports no power."""

    class NVMLError(Exception):
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        raise self.NVMLError("Not Supported")


def test_gpu_usage_units() -> None:
    one = gpu._usage(FakeNvml(), 0)
    assert one == gpu.GpuUsage(0, 0.37, 3 * 2**30, 80 * 2**30, None)


def test_sampler_sets_gpu_gauges(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    boards = [gpu.GpuUsage(0, 0.5, 10, 100, 250.0), gpu.GpuUsage(1, 0.0, 0, 100, None)]
    monkeypatch.setattr(gpu, "usage", lambda: gpu.Usage(gpus=boards))
    NodeSampler(None, node="n1").sample()
    assert recorder.of("mpsserve_gpu_utilization_ratio") == [
        (0.5, {"node": "n1", "gpu": "0"}),
        (0.0, {"node": "n1", "gpu": "1"}),
    ]
    assert [t["gpu"] for _, t in recorder.of("mpsserve_gpu_memory_used_bytes")] == ["0", "1"]
    assert recorder.of("mpsserve_gpu_power_watts") == [(250.0, {"node": "n1", "gpu": "0"})]


def test_the_guardian_leader_runs_the_sampler(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the stand-in control daemon, with one stand-in MPS client."""
    monkeypatch.setattr(gpu, "usage", no_nvml)
    control = standin_control(tmp_path)
    with daemon(control), standin_client(control):
        guardian = Guardian(control, tmp_path / "state", interval_s=0.2)
        guardian.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                v == 1 for v, _ in recorder.of("mpsserve_mps_clients")
            ):
                time.sleep(0.1)
        finally:
            guardian.stop()
            guardian.join(5)
        assert guardian.sampler is not None
        guardian.sampler.join(5)
        assert not guardian.sampler.is_alive()  # stopped with its guardian
    assert (1, {"node": guardian.sampler.node}) in recorder.of("mpsserve_mps_daemon_up")
    assert any(v == 1 for v, _ in recorder.of("mpsserve_mps_clients"))
