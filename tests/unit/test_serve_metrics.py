"""Frames counted in Ray Serve's own request metrics (metrics.SERVE_*), without Ray: the names,
tag keys and buckets Serve 2.60 and its dashboards use, and what one frame records. That the
Ray export shows them per deployment is tests/integration/test_serve_request_metrics.py."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from mpsserve import metrics
from mpsserve.errors import InvalidInput
from mpsserve.protocol import frame
from mpsserve.serving.model import ModelReplica
from tests.unit.conftest import Recorder

RAY = Path(ray.__file__).parent
TAGS = metrics.ServeTags("model-rec", "abc123", "mpsserve")


def test_the_names_are_the_ones_serve_records_and_its_dashboards_read() -> None:
    replica_source = (RAY / "serve/_private/replica.py").read_text()
    panels = (RAY / "dashboard/modules/metrics/dashboards/serve_dashboard_panels.py").read_text()
    for spec in metrics.SERVE_METRICS:
        assert f'"{spec.name}"' in replica_source, spec.name
        assert "ray_" + spec.name in panels, spec.name
    # Serve adds deployment, replica, application before its own keys (serve/metrics.py).
    from ray.serve.metrics import _add_serve_metric_tags

    assert _add_serve_metric_tags(("route",)) == ("route",)  # no replica context here
    assert metrics.SERVE_TAGS == ("deployment", "replica", "application", "route")
    assert re.search(r'tag_keys=\("route", "exception_type"\)', replica_source)


def test_the_latency_buckets_are_serves() -> None:
    from ray.serve._private.constants import REQUEST_LATENCY_BUCKETS_MS

    assert metrics.SERVE_LATENCY.buckets == tuple(REQUEST_LATENCY_BUCKETS_MS)
    assert tuple(REQUEST_LATENCY_BUCKETS_MS) == metrics.SERVE_DEFAULT_BUCKETS_MS


def test_routes_are_a_bounded_set() -> None:
    assert TAGS.route("infer")["route"] == "/infer"
    assert TAGS.route("metadata")["route"] == "/metadata"
    assert TAGS.route("a" * 1000)["route"] == "/other"
    assert TAGS.route(None)["route"] == "/other"
    assert TAGS.route("infer") is TAGS.route("infer")  # built once


def test_a_frame_counts_once_as_a_request_or_as_an_error(recorder: Recorder) -> None:
    metrics.observe_serve_request(TAGS.route("infer"), 0.004)
    metrics.observe_serve_request(TAGS.route("infer"), -1.0, InvalidInput("bad"))
    metrics.flush_counts()
    want = {"deployment": "model-rec", "replica": "abc123", "application": "mpsserve"}
    assert recorder.of("serve_deployment_request_counter") == [(1, {**want, "route": "/infer"})]
    assert recorder.of("serve_deployment_error_counter") == [
        (1, {**want, "route": "/infer", "exception_type": "InvalidInput"})
    ]
    latencies = recorder.of("serve_deployment_processing_latency_ms")
    assert [value for value, _ in latencies] == [4.0, 0.0]


def _handle(answer: Any, header: dict[str, Any]) -> list[frame.Buffer]:
    def answering(op: object, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        if isinstance(answer, BaseException):
            raise answer
        return list(answer)

    replica = SimpleNamespace(_serve_tags=TAGS, _answer=answering)
    # The class under Serve's wrapper: serve.deployment makes the class a Deployment, and its
    # stubs do not say so (mpsserve/serving/app.py).
    handle_frame = ModelReplica.func_or_class.handle_frame  # type: ignore[attr-defined]
    return handle_frame(replica, header, bytearray())


def test_handle_frame_records_every_outcome(recorder: Recorder) -> None:
    header = {"op": "infer", "_received": 1.0}
    _handle([b"ok"], dict(header))
    error = frame.decode_header(bytearray(_handle(InvalidInput("no"), dict(header))[1]))
    assert error.get("ok") is False
    with pytest.raises(RuntimeError):
        _handle(RuntimeError("a bug"), {"op": "metadata", "_received": 1.0})
    metrics.flush_counts()
    assert len(recorder.of("serve_deployment_request_counter")) == 1
    errors = [tags for _, tags in recorder.of("serve_deployment_error_counter")]
    assert [(t["route"], t["exception_type"]) for t in errors] == [
        ("/infer", "InvalidInput"),
        ("/metadata", "RuntimeError"),
    ]
    assert len(recorder.of("serve_deployment_processing_latency_ms")) == 3


def test_counts_are_summed_between_flushes(recorder: Recorder) -> None:
    metrics.flush_counts()  # the clock starts: the next frames wait for COUNTS_FLUSH_S
    for _ in range(3):
        metrics.observe_serve_request(TAGS.route("infer"), 0.001)
    metrics.observe_serve_request(TAGS.route("metadata"), 0.001)
    assert recorder.of("serve_deployment_request_counter") == []
    assert len(recorder.of("serve_deployment_processing_latency_ms")) == 4  # never held
    metrics.flush_counts()
    assert sorted(
        (tags["route"], value) for value, tags in recorder.of("serve_deployment_request_counter")
    ) == [("/infer", 3), ("/metadata", 1)]
    metrics.flush_counts()  # nothing new: nothing recorded (Ray refuses +0)
    assert len(recorder.of("serve_deployment_request_counter")) == 2


def test_a_frame_after_the_period_flushes(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.flush_counts()
    monkeypatch.setattr(metrics, "COUNTS_FLUSH_S", 0.0)
    metrics.observe_serve_request(TAGS.route("infer"), 0.001)
    assert [value for value, _ in recorder.of("serve_deployment_request_counter")] == [1]
