"""Integration tier: one real local Ray + Serve session, the app deployed once per session."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpsserve.config import parse_config

#: Shifts the session's ports, so two checkouts can run the tier on one machine at once
#: (the ingress binds with SO_REUSEPORT: two sessions on one port would share traffic).
PORT_OFFSET = int(os.environ.get("MPSSERVE_TEST_PORT_OFFSET", "0"))
HTTP_PORT = 28000 + PORT_OFFSET  # outside Ray's worker port range (10002-19999)
GRPC_PORT = 29000 + PORT_OFFSET
METRICS_PORT = 29100 + PORT_OFFSET  # Ray's Prometheus endpoint for the session's node
INGRESS_METRICS_PORT = 27100 + PORT_OFFSET  # the ingress's GET /metrics (ingress.metrics_port)


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`mpsserve serve` subprocesses keep their cluster records here, not in ~/.mpsserve."""
    previous = os.environ.get("MPSSERVE_STATE_DIR")
    os.environ["MPSSERVE_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    if previous is None:
        os.environ.pop("MPSSERVE_STATE_DIR", None)
    else:
        os.environ["MPSSERVE_STATE_DIR"] = previous


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def service_config(tf_store: Path) -> dict[str, object]:
    return {
        "models": [
            {
                "name": "rec",
                "store": str(tf_store),
                "max_rows": 4000,
                "intra_op_threads": 1,
                "placement": {"cpu_replicas": 1, "cpus_per_replica": 0.5},
            }
        ],
        "ingress": {
            "http_port": HTTP_PORT,
            "grpc_port": GRPC_PORT,
            "metrics_port": INGRESS_METRICS_PORT,
            "host": "127.0.0.1",
            "max_request_mb": 16,
            "cpus_per_replica": 0.5,
            # short timeouts and a low in-flight bound, so the abuse tests
            # (test_ingress_limits.py) see them act within seconds
            "limits": {
                "header_timeout_s": 2,
                "body_idle_timeout_s": 2,
                "max_in_flight_requests": 48,
                "grpc_idle_timeout_s": 5,
            },
        },
        "transport": {"bind_host": "127.0.0.1"},  # data ports on loopback only
    }


@pytest.fixture(scope="session")
def base_url(service_config: dict[str, object]) -> Iterator[str]:
    """Start Ray and Serve, deploy the app; torn down after the session."""
    import ray
    from ray import serve

    from mpsserve.serving.app import build_app, serve_options, wait_routable

    config = parse_config(service_config)
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _metrics_export_port=METRICS_PORT,
    )
    try:
        serve.start(**serve_options(config))
        serve.run(
            build_app(config, cluster_gpus=0, cluster_cpus=4), name="mpsserve", route_prefix=None
        )
        wait_routable(config)
        yield f"http://127.0.0.1:{HTTP_PORT}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def grpc_address(base_url: str) -> str:
    """The same deployed app's gRPC proxy."""
    return f"127.0.0.1:{GRPC_PORT}"
