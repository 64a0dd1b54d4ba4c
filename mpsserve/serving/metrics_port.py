"""The ingress's metrics port wired to Ray (``mpsserve.ingress.metrics_port`` holds the
logic): where this node's Ray metrics agent listens, and the small uvicorn server that
answers ``GET /metrics`` on ``ingress.metrics_port``, apart from the inference API, as
Triton's metrics port is. It runs on the ingress's event loop.
"""

from __future__ import annotations

import logging
from typing import Any

from mpsserve.config import IngressConfig
from mpsserve.ingress.guard import GuardLimits, guarded_protocol
from mpsserve.ingress.metrics_port import AgentMetrics, MetricsApp, host_port

logger = logging.getLogger(__name__)
#: Scrapers are few: more connections than this at once are refused (503).
MAX_CONNECTIONS = 64
#: A scrape is a GET: a body is refused past this.
MAX_BODY_BYTES = 1024


def node_agent_address() -> str | None:
    """``host:port`` of this node's Ray metrics agent (where Prometheus would scrape the
    node), or None while Ray does not know it. Blocking (a GCS call in the fallback)."""
    import ray

    host, port = _from_worker()
    if not port:
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                host, port = node.get("NodeManagerAddress"), node.get("MetricsExportPort")
    if not host or not isinstance(port, int) or port <= 0:
        return None
    return host_port(host, port)


def _from_worker() -> tuple[str | None, int | None]:
    """What this worker's node handle says (a private attribute: None when it moves)."""
    try:
        import ray

        node = ray._private.worker.global_worker.node
        return str(node.node_ip_address), int(node.metrics_export_port or 0)
    except Exception:
        return None, None


def metrics_server(config: IngressConfig, app_name: str) -> Any:
    """The uvicorn server of the metrics port (serve it with ``sockets=[...]``)."""
    import uvicorn

    guard = GuardLimits.of(config.limits, MAX_CONNECTIONS, MAX_BODY_BYTES)
    source = AgentMetrics(node_agent_address, app_name)
    return uvicorn.Server(
        uvicorn.Config(
            MetricsApp(source.text),
            lifespan="off",
            log_config=None,  # uvicorn's dictConfig would close Serve's log handlers
            log_level="warning",
            access_log=False,
            http=guarded_protocol(guard),  # no token: Prometheus scrapes it as Triton's :8002
            loop="none",
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        )
    )
