"""The ingress's metrics port (mpsserve/ingress/metrics_port.py): which series of a Ray
export it keeps, how it reads the agent (a real HTTP server on loopback standing in for
Ray's agent: bounded, timed out, shared by concurrent scrapes), and its answers. The port on
a real Ray is tests/integration/test_metrics_port.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mpsserve.config import IngressConfig
from mpsserve.errors import MetricsUnavailable
from mpsserve.ingress.metrics_port import (
    AgentMetrics,
    MetricsApp,
    fetch_agent,
    filter_exposition,
    host_port,
    sample_labels,
)
from mpsserve.ops.status import metrics_targets, metrics_urls

#: What a node's Ray metrics agent answers, cut down: two Serve apps, Ray's own series, and
#: a family whose metadata is repeated (as two collectors of one registry may write it).
RAY_EXPORT = """\
# HELP ray_node_cpu_utilization Total CPU usage on a ray node
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{InstanceId="",SessionName="s",ip="10.0.0.5"} 12.5
# HELP ray_mpsserve_requests_total Requests answered at the ingress, by outcome
# TYPE ray_mpsserve_requests_total counter
ray_mpsserve_requests_total{Component="core_worker",model="rec",protocol="http",status="ok",version="1"} 3.0
# HELP ray_mpsserve_request_duration_seconds End-to-end request time at the ingress
# TYPE ray_mpsserve_request_duration_seconds histogram
ray_mpsserve_request_duration_seconds_bucket{le="0.003",model="rec",protocol="http"} 0.0
ray_mpsserve_request_duration_seconds_bucket{le="+Inf",model="rec",protocol="http"} 3.0
ray_mpsserve_request_duration_seconds_count{model="rec",protocol="http"} 3.0
ray_mpsserve_request_duration_seconds_sum{model="rec",protocol="http"} 0.0102
# HELP ray_serve_deployment_request_counter_total The number of queries that have been processed in this replica.
# TYPE ray_serve_deployment_request_counter_total counter
ray_serve_deployment_request_counter_total{application="shop",deployment="model-rec",replica="r1",route="/infer"} 6.0
ray_serve_deployment_request_counter_total{application="other",deployment="model-x",replica="r9",route="/infer"} 60.0
ray_serve_deployment_request_counter_total{application="shop2",deployment="model-rec",replica="r2",route="/infer"} 1.0
# HELP ray_serve_controller_control_loop_duration_s The duration of the controller loop.
# TYPE ray_serve_controller_control_loop_duration_s gauge
ray_serve_controller_control_loop_duration_s{SessionName="s"} 0.01
# HELP ray_serve_replica_processing_queries The current number of queries being processed.
# TYPE ray_serve_replica_processing_queries gauge
ray_serve_replica_processing_queries{application="other",deployment="model-x",replica="r9"} 2.0
# HELP ray_mpsserve_requests_in_flight Requests being handled by this process
# TYPE ray_mpsserve_requests_in_flight gauge
ray_mpsserve_requests_in_flight{model="rec",route="a\\"b,application=\\"x\\"",WorkerId="w1"} 1.0
# HELP ray_mpsserve_requests_in_flight Requests being handled by this process
# TYPE ray_mpsserve_requests_in_flight gauge
ray_mpsserve_requests_in_flight{model="rec",WorkerId="w2"} 2.0
"""  # noqa: E501


def names(text: str) -> list[str]:
    return [s.name for f in text_string_to_metric_families(text) for s in f.samples]


def test_sample_labels_reads_names_and_labels_escapes_included() -> None:
    assert sample_labels('a_total{x="1",y="2"} 3') == ("a_total", {"x": "1", "y": "2"})
    assert sample_labels("up 1") == ("up", {})
    assert sample_labels('m{v="a\\"b,c=\\"d\\""} 1') == ("m", {"v": 'a\\"b,c=\\"d\\"'})
    assert sample_labels('m{x="1",} 1') == ("m", {"x": "1"})
    assert sample_labels('m{x="unterminated} 1') is None
    assert sample_labels("") is None


def test_filter_keeps_the_services_series_and_this_apps_serve_series_only() -> None:
    kept = filter_exposition(RAY_EXPORT, "shop")
    samples = [
        (s.name, s.labels.get("application"), s.value)
        for f in text_string_to_metric_families(kept)
        for s in f.samples
    ]
    assert ("ray_serve_deployment_request_counter_total", "shop", 6.0) in samples
    serve = [s for s in samples if s[0].startswith("ray_serve_")]
    assert {app for _, app, _ in serve} == {"shop"}  # not "other", not "shop2", none unlabelled
    assert "ray_node_cpu_utilization" not in names(kept)
    assert set(names(kept)) == {
        "ray_mpsserve_requests_total",
        "ray_mpsserve_request_duration_seconds_bucket",
        "ray_mpsserve_request_duration_seconds_count",
        "ray_mpsserve_request_duration_seconds_sum",
        "ray_serve_deployment_request_counter_total",
        "ray_mpsserve_requests_in_flight",
    }
    # a label value that merely contains `application="x"` is no application label
    in_flight = [s for s in samples if s[0] == "ray_mpsserve_requests_in_flight"]
    assert sorted(v for *_, v in in_flight) == [1.0, 2.0]


def test_filter_writes_each_familys_metadata_once_before_its_samples() -> None:
    kept = filter_exposition(RAY_EXPORT, "shop").splitlines()
    helps = [line for line in kept if line.startswith("# HELP")]
    assert len(helps) == len(set(helps)) == 4  # requests, duration, serve counter, in flight
    assert not any("controller" in line or "processing_queries" in line for line in kept)
    first = kept.index("# TYPE ray_mpsserve_request_duration_seconds histogram")
    assert kept[first + 1].startswith("ray_mpsserve_request_duration_seconds_bucket")
    families = {f.name: f.type for f in text_string_to_metric_families("\n".join(kept))}
    assert families["ray_mpsserve_request_duration_seconds"] == "histogram"
    assert families["ray_mpsserve_requests_in_flight"] == "gauge"


def test_filter_of_nothing_wanted_is_empty() -> None:
    assert filter_exposition(RAY_EXPORT, "nobody").count("ray_serve_") == 0
    assert filter_exposition("# HELP x y\n# TYPE x gauge\nx 1\n", "shop") == ""
    assert filter_exposition("", "shop") == ""


def test_host_port_brackets_ipv6() -> None:
    assert host_port("10.0.0.5", 8002) == "10.0.0.5:8002"
    assert host_port("::1", 8002) == "[::1]:8002"


# The agent, read over real HTTP on loopback.


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def agent(body: bytes, status: int = 200, delay_s: float = 0.0) -> AsyncIterator[Any]:
    """A loopback HTTP server answering every request with ``body``; counts the requests."""
    served = {"count": 0}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        served["count"] += 1
        await asyncio.sleep(delay_s)
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", served
    finally:
        server.close()


def closed_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_fetch_reads_the_agent_and_refuses_what_it_cannot_use() -> None:
    async def run() -> None:
        async with agent(b"x 1\n") as (address, _):
            assert await fetch_agent(address, 2.0, 1024) == b"x 1\n"
        async with agent(b"x" * 5000) as (address, _):
            with pytest.raises(MetricsUnavailable, match="over 4096 bytes"):
                await fetch_agent(address, 2.0, 4096)
        async with agent(b"oops", status=500) as (address, _):
            with pytest.raises(MetricsUnavailable, match="answered HTTP 500"):
                await fetch_agent(address, 2.0, 1024)
        async with agent(b"x 1\n", delay_s=5) as (address, _):
            with pytest.raises(MetricsUnavailable, match=r"no answer within 0\.3 s"):
                await fetch_agent(address, 0.3, 1024)
        with pytest.raises(MetricsUnavailable, match="cannot read this node's Ray metrics agent"):
            await fetch_agent(closed_address(), 2.0, 1024)

    asyncio.run(run())


def test_concurrent_scrapes_share_one_read_of_the_agent() -> None:
    async def run() -> None:
        async with agent(RAY_EXPORT.encode(), delay_s=0.2) as (address, served):
            located: list[str] = []

            def locate() -> str:
                located.append(address)
                return address

            source = AgentMetrics(locate, "shop", cache_s=0.5)
            answers = await asyncio.gather(*(source.text() for _ in range(20)))
            assert served["count"] == 1 and len(set(answers)) == 1
            assert "ray_serve_deployment_request_counter_total" in answers[0]
            await source.text()  # within cache_s: no second read
            assert served["count"] == 1
            await asyncio.sleep(0.6)
            await source.text()
            assert served["count"] == 2 and len(located) == 1  # the address is looked up once

    asyncio.run(run())


def test_an_unknown_or_dead_agent_is_a_503_with_its_reason_and_looked_up_again() -> None:
    async def run() -> None:
        lookups: list[str | None] = [None, closed_address()]
        source = AgentMetrics(lambda: lookups.pop(0) if lookups else None, "shop", cache_s=0)
        app = MetricsApp(source.text)
        status, body, headers = await call(app, "/metrics")
        assert status == 503 and b"Ray has not said where" in body
        status, body, headers = await call(app, "/metrics")
        assert status == 503 and b"cannot read this node's Ray metrics agent" in body
        assert headers["retry-after"] == "5"

    asyncio.run(run())


async def call(app: MetricsApp, path: str, method: str = "GET") -> tuple[int, bytes, dict]:
    """One request through the ASGI app: (status, body, headers)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "path": path, "method": method}, receive, send)
    headers = {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], sent[1]["body"], headers


def test_the_app_answers_metrics_only() -> None:
    async def text() -> str:
        return "ray_mpsserve_requests_total 1.0\n"

    async def run() -> None:
        app = MetricsApp(text)
        status, body, headers = await call(app, "/metrics")
        assert status == 200 and body == b"ray_mpsserve_requests_total 1.0\n"
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert headers["content-length"] == str(len(body))
        status, body, _ = await call(app, "/metrics", "HEAD")
        assert status == 200 and body == b""
        assert (await call(app, "/v2/models/rec/infer", "POST"))[0] == 404
        status, _, headers = await call(app, "/metrics", "POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"

    asyncio.run(run())


# Config and where the endpoints are listed.


def test_metrics_port_defaults_to_8002_can_be_off_and_must_be_its_own() -> None:
    assert IngressConfig().metrics_port == 8002
    assert IngressConfig(metrics_port=None).metrics_port is None
    with pytest.raises(ValueError, match="metrics_port 8000 is also the HTTP or gRPC port"):
        IngressConfig(metrics_port=8000)
    with pytest.raises(ValueError, match="less than or equal to 65535"):
        IngressConfig(metrics_port=70000)


def test_metrics_targets_are_one_per_node() -> None:
    entries: list[dict[str, Any]] = [
        {"host": "10.0.0.5", "metrics_address": "10.0.0.5:8002"},
        {"host": "10.0.0.5", "metrics_address": "10.0.0.5:8002"},
        {"host": "10.0.0.6", "metrics_address": "10.0.0.6:8002"},
        {"host": "10.0.0.7", "metrics_address": None},  # metrics_port: null there
        {"host": "10.0.0.8"},  # an ingress of an older release
    ]
    assert metrics_targets(entries) == ["10.0.0.5:8002", "10.0.0.6:8002"]
    assert metrics_urls(entries)[0] == "http://10.0.0.5:8002/metrics"
