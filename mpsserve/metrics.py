"""The service's own metrics, defined in one place, exported through Ray's metrics.

Recorded with ``ray.util.metrics``; each node's Ray metrics agent serves them in Prometheus
text format at that node's metrics export port (``ray start --metrics-export-port``,
``ray.init(_metrics_export_port=...)``), beside Ray's own metrics. The ingress's metrics port
(``ingress.metrics_port``, ``mpsserve.ingress.metrics_port``) reads that agent and serves this
service's series alone on a stable port, which Prometheus scrapes (deployments/prometheus).

Exported names (Ray 2.60, checked by tests/integration/test_metrics_export.py): Ray prefixes
every name with ``ray_`` (``mpsserve_requests_total`` -> ``ray_mpsserve_requests_total``);
counters keep their ``_total``; a histogram exports ``_bucket``, ``_count`` and ``_sum``, where
``_sum`` is approximate because Ray's agent rebuilds histograms from bucket counts at bucket
midpoints (use quantiles or bucket ratios, not ``_sum``, for latency). Every series also carries
Ray's labels (``SessionName``, ``NodeAddress``, ``WorkerId``, ``Component``, ``Version``): one
series per process, so queries aggregate with ``sum by`` / ``max by``.

Beside them, a model replica records the frames it serves in Ray Serve's own request metrics
(``SERVE_*``, Serve's names and labels), which Serve cannot see on the data port and which the
Ray dashboard's Serve views read.

Ray's metric objects can only be made in a connected Ray driver or worker, so they are made on
first use, never at import. Nothing here raises into the request path: where Ray's metrics are
unavailable (no Ray, a failing recorder) a value is dropped and the first failure is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from mpsserve.periodic import Periodic

logger = logging.getLogger(__name__)

#: What Ray's exporter puts before every custom metric name.
EXPORT_PREFIX = "ray_"
#: Durations in milliseconds, fine enough to tell single milliseconds apart below 10 ms.
LATENCY_BUCKETS_MS = (
    0.5, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100, 150, 250, 500,
    1000, 2500, 5000,
)  # fmt: skip
LATENCY_BUCKETS_S = tuple(ms / 1000 for ms in LATENCY_BUCKETS_MS)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> tuple[str, ...]:
        """The sample names Prometheus sees for this metric."""
        base = EXPORT_PREFIX + self.name
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_count", f"{base}_sum")
        return (base,)


def _spec(name: str, kind: Kind, description: str, *tags: str) -> MetricSpec:
    buckets = LATENCY_BUCKETS_S if kind == "histogram" else ()
    return MetricSpec(name, kind, description, tags, buckets)


REQUESTS = _spec(
    "mpsserve_requests_total",
    "counter",
    "Requests answered at the ingress, by outcome",
    *("model", "version", "protocol", "status"),
)
ROWS = _spec("mpsserve_rows_total", "counter", "Rows (candidates) scored", "model", "version")
REQUEST_DURATION = _spec(
    "mpsserve_request_duration_seconds",
    "histogram",
    "End-to-end request time at the ingress",
    *("model", "protocol"),
)
QUEUE_DURATION = _spec(
    "mpsserve_queue_duration_seconds",
    "histogram",
    "Time a request waited in a model replica before inference",
    "model",
)
INFERENCE_DURATION = _spec(
    "mpsserve_inference_duration_seconds",
    "histogram",
    "Time of the model call in a replica",
    *("model", "version"),
)
STALLED_ATTEMPTS = _spec(
    "mpsserve_stalled_attempts_total",
    "counter",
    "Attempts an ingress gave up waiting for (past the per-attempt timeout): the replica was "
    "set aside and the request sent to another one as well",
    *("model", "replica"),
)
IN_FLIGHT = _spec(
    "mpsserve_requests_in_flight", "gauge", "Requests being handled by this process", "model"
)
SERVED_VERSION = _spec(
    "mpsserve_served_version",
    "gauge",
    "1 for each version a replica serves, 0 for one it no longer serves",
    *("model", "replica", "version"),
)
LOAD_FAILURES = _spec(
    "mpsserve_load_failures_total",
    "counter",
    "Model versions that failed to load or warm up",
    *("model", "version"),
)
SWAPS = _spec(
    "mpsserve_swaps_total", "counter", "Swaps to a newly loaded version", "model", "version"
)
CPU_OPS = _spec(
    "mpsserve_model_cpu_ops",
    "gauge",
    "Ops of a loaded model version placed on the CPU instead of the GPU",
    *("model", "version"),
)
WARMUP_REQUESTS = _spec(
    "mpsserve_warmup_requests_total",
    "counter",
    "Requests run to warm a version up before it serves: source=file for those of its TF "
    "Serving warm-up file (assets.extra/tf_serving_warmup_requests), synthetic for the rest",
    *("model", "version", "source"),
)
WARMUP_SECONDS = _spec(
    "mpsserve_warmup_seconds_total",
    "counter",
    "Time spent warming versions up before they serve, by the source of the requests",
    *("model", "version", "source"),
)
MPS_UP = _spec(
    "mpsserve_mps_daemon_up", "gauge", "1 when the node's MPS control daemon answers", "node"
)
MPS_RESTARTS = _spec(
    "mpsserve_mps_daemon_restarts_total",
    "counter",
    "Restarts of the node's MPS control daemon (a new daemon pid), counted by its guardian",
    "node",
)
MPS_CLIENTS = _spec(
    "mpsserve_mps_clients",
    "gauge",
    "MPS client processes (gpu='all': one MPS server serves every GPU of the node)",
    *("node", "gpu"),
)
GPU_UTILIZATION = _spec(
    "mpsserve_gpu_utilization_ratio",
    "gauge",
    "Share of the last NVML sample period in which a kernel ran, 0..1",
    *("node", "gpu"),
)
GPU_MEMORY_USED = _spec(
    "mpsserve_gpu_memory_used_bytes", "gauge", "GPU memory in use", "node", "gpu"
)
GPU_MEMORY_TOTAL = _spec(
    "mpsserve_gpu_memory_total_bytes", "gauge", "GPU memory installed", "node", "gpu"
)
EMBEDDING_IDS = _spec(
    "mpsserve_embedding_ids_total",
    "counter",
    "Distinct embedding ids of split models' requests, by level: requested (distinct ids per "
    "request and table), node_cache (hits in the node's shared cache), store (fetched from "
    "the embedding store); hit rate = node_cache / requested",
    *("model", "table", "level"),
)
EMBEDDING_LOOKUP_DURATION = _spec(
    "mpsserve_embedding_lookup_duration_seconds",
    "histogram",
    "Time to look up one request's embeddings (every table: caches and store)",
    "model",
)
EMBEDDING_STORE_ERRORS = _spec(
    "mpsserve_embedding_store_errors_total",
    "counter",
    "Requests of split models failed by the embedding store (unreachable, a shard down)",
    "model",
)
GPU_POWER = _spec("mpsserve_gpu_power_watts", "gauge", "GPU board power draw", "node", "gpu")

METRICS: tuple[MetricSpec, ...] = (
    REQUESTS, ROWS, REQUEST_DURATION, QUEUE_DURATION, INFERENCE_DURATION, STALLED_ATTEMPTS,
    IN_FLIGHT, SERVED_VERSION, LOAD_FAILURES, SWAPS, CPU_OPS, MPS_UP, MPS_RESTARTS, MPS_CLIENTS,
    GPU_UTILIZATION, GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_POWER,
    WARMUP_REQUESTS, WARMUP_SECONDS,
    EMBEDDING_IDS, EMBEDDING_LOOKUP_DURATION, EMBEDDING_STORE_ERRORS,
)  # fmt: skip


#: Ray Serve's own per-replica request metrics (Ray 2.60 ``serve/_private/replica.py``,
#: ``ReplicaMetricsManager``), which the Ray dashboard's Serve and Serve Deployment views read.
#: Frames reach a model replica on its data port, beside Serve's handle path, so Serve counts
#: none of them; the replica records them here under Serve's names, tag keys (in Serve's order)
#: and latency buckets. A second registration of a name in the replica process is safe: both
#: objects feed one instrument (measured: Serve's handle calls and the frames appear as two
#: series of one metric, told apart by ``route``, each with its exact count).
SERVE_TAGS = ("deployment", "replica", "application", "route")
#: Serve's default ``REQUEST_LATENCY_BUCKETS_MS`` (``RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS``
#: changes Serve's; ``serve_latency_buckets_ms`` follows it).
SERVE_DEFAULT_BUCKETS_MS = (
    1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000, 5000, 10000, 60000, 120000,
    300000, 600000,
)  # fmt: skip


def serve_latency_buckets_ms() -> tuple[float, ...]:
    """Serve's own buckets in this process (a second registration must match the first)."""
    try:
        from ray.serve._private.constants import REQUEST_LATENCY_BUCKETS_MS

        return tuple(float(b) for b in REQUEST_LATENCY_BUCKETS_MS)
    except Exception:  # a private name: fall back to Serve 2.60's default
        return SERVE_DEFAULT_BUCKETS_MS


SERVE_REQUESTS = MetricSpec(
    "serve_deployment_request_counter",
    "counter",
    "The number of queries that have been processed in this replica.",
    SERVE_TAGS,
)
SERVE_ERRORS = MetricSpec(
    "serve_deployment_error_counter",
    "counter",
    "The number of exceptions that have occurred in this replica.",
    (*SERVE_TAGS, "exception_type"),
)
SERVE_LATENCY = MetricSpec(
    "serve_deployment_processing_latency_ms",
    "histogram",
    "The latency for queries to be processed.",
    SERVE_TAGS,
    serve_latency_buckets_ms(),
)
SERVE_METRICS = (SERVE_REQUESTS, SERVE_ERRORS, SERVE_LATENCY)
#: The ``route`` a frame is counted under: its operation (a bounded set: a peer's op is text).
SERVE_ROUTES = {"infer": "/infer", "metadata": "/metadata"}
SERVE_OTHER_ROUTE = "/other"


def exported_names() -> set[str]:
    """Every sample name this module's metrics appear under in a Prometheus scrape."""
    return {name for spec in METRICS for name in spec.exported}


class Backend(Protocol):
    """Where values go: Ray's metrics in a service, a recorder in unit tests."""

    def record(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None: ...


_Series = tuple[str, tuple[tuple[str, str], ...]]  # a metric's name and its label values


class RayBackend:
    """``ray.util.metrics`` objects, made on first use in a connected Ray process.

    Ray 2.60's metrics agent forgets a gauge series that is not set again within two report
    intervals (ray-project/ray#64633), and a worker reports only values set since its last
    report, so a gauge set once vanishes after ~20 s. This backend therefore sets every gauge
    it holds again, twice per report interval, for as long as the process lives.
    """

    def __init__(
        self,
        make: Callable[[MetricSpec], Any] | None = None,
        connected: Callable[[], bool] | None = None,
        refresh_s: float | None = None,
    ) -> None:
        self._make = make or _ray_metric  # None where Ray is not connected
        self._connected = connected or _ray_connected
        self._refresh_s = refresh_s
        self._made: dict[str, Any] = {}
        self._gauges: dict[_Series, tuple[Any, float, dict[str, str]]] = {}  # latest values
        self._lock = threading.Lock()
        self._refresher: Periodic | None = None
        self._closed = False
        self._told_no_ray = False

    def record(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        metric = self._metric(spec)
        if metric is None:
            return
        if spec.kind == "counter":
            metric.inc(value, tags=tags)
        elif spec.kind == "histogram":
            metric.observe(value, tags=tags)
        else:
            with self._lock:  # so a refresh never sets an older value after this one
                self._gauges[(spec.name, tuple(sorted(tags.items())))] = (metric, value, tags)
                metric.set(value, tags=tags)
                self._start_refresher()

    def close(self) -> None:
        """Stop setting gauges again (tests)."""
        self._closed = True
        if self._refresher is not None:
            self._refresher.stop()

    def _metric(self, spec: MetricSpec) -> Any:
        made = self._made.get(spec.name)
        if made is not None:
            return made
        with self._lock:
            if spec.name not in self._made:
                made = self._make(spec)
                if made is None:
                    self._no_ray()
                    return None
                self._made[spec.name] = made
            return self._made[spec.name]

    def _no_ray(self) -> None:
        if not self._told_no_ray:
            self._told_no_ray = True
            logger.info("Ray is not initialized in this process; metrics are not recorded")

    def _start_refresher(self) -> None:
        if self._refresher is None and not self._closed:
            period = self._refresh_s or _refresh_period_s()
            self._refresher = Periodic(
                "mpsserve-gauge-refresh", period, self._refresh, immediately=False
            )
            self._refresher.start()

    def _refresh(self) -> None:
        if self._connected():  # not after ray.shutdown() in a driver
            with self._lock:
                for metric, value, tags in self._gauges.values():
                    metric.set(value, tags=tags)


def _refresh_period_s() -> float:
    """Half of Ray's metrics report interval (10 s by default), at least 0.5 s."""
    try:
        import ray

        interval_ms = float(ray._config.metrics_report_interval_ms())
    except Exception:  # a private API: fall back to Ray's default
        interval_ms = 10_000.0
    return max(interval_ms / 2000, 0.5)


def _ray_connected() -> bool:
    import ray

    return bool(ray.is_initialized())


def _ray_metric(spec: MetricSpec) -> Any:
    """A ``ray.util.metrics`` object, or None outside a connected Ray process."""
    if not _ray_connected():
        return None
    from ray.util import metrics as ray_metrics

    if spec.kind == "counter":
        return ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
    return ray_metrics.Histogram(
        spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.tags
    )


_backend: Backend = RayBackend()
_lock = threading.Lock()  # the process-local bookkeeping below
_in_flight: dict[str, int] = {}
_served: dict[tuple[str, str], set[str]] = {}
_failed: set[str] = set()  # metric names whose failure was logged
#: Counter increments not yet given to Ray, per series: [spec, count, tags].
_pending: dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]] = {}
_flushed_at = 0.0  # time.monotonic() of the last flush_counts


def use_backend(backend: Backend) -> Backend:
    """Send values to ``backend`` from now on (tests); clears the bookkeeping. Returns the old."""
    global _backend
    with _lock:
        previous, _backend = _backend, backend
        _in_flight.clear()
        _served.clear()
        _failed.clear()
        _pending.clear()
    return previous


def _record(spec: MetricSpec, value: float, **tags: str) -> None:
    _record_tags(spec, value, {key: str(val) for key, val in tags.items()})


def _record_tags(spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
    """``_record`` with the tags ready (strings): the per-frame path builds them once."""
    try:
        _backend.record(spec, value, tags)
    except Exception:
        if spec.name not in _failed:
            _failed.add(spec.name)
            logger.warning("metric %s not recorded; going on without it", spec.name, exc_info=True)


def observe_request(
    model: str, version: str, protocol: str, status: str, rows: int, seconds: float
) -> None:
    """One request answered at the ingress (any outcome), with its end-to-end time."""
    _record(REQUESTS, 1, model=model, version=version, protocol=protocol, status=status)
    if rows > 0:  # a Ray counter refuses increments <= 0
        _record(ROWS, rows, model=model, version=version)
    _record(REQUEST_DURATION, max(seconds, 0.0), model=model, protocol=protocol)


def observe_inference(
    model: str, version: str, queue_seconds: float, inference_seconds: float
) -> None:
    """One model call in a replica: how long it waited, then how long it ran."""
    _record(QUEUE_DURATION, max(queue_seconds, 0.0), model=model)
    _record(INFERENCE_DURATION, max(inference_seconds, 0.0), model=model, version=version)


class ServeTags:
    """A replica's tags for Serve's request metrics, one dict per route, built once: a frame
    then costs two records (~5 µs each on CPU, measured), no dict building."""

    def __init__(self, deployment: str, replica: str, application: str) -> None:
        base = {"deployment": deployment, "replica": replica, "application": application}
        self._by_op = {op: {**base, "route": route} for op, route in SERVE_ROUTES.items()}
        self._other = {**base, "route": SERVE_OTHER_ROUTE}

    @classmethod
    def of_replica(cls) -> ServeTags:
        """This Serve replica's names (only inside a replica: Serve's context)."""
        from ray import serve

        context = serve.get_replica_context()
        return cls(context.deployment, context.replica_tag, context.app_name)

    def route(self, op: object) -> dict[str, str]:
        return self._by_op.get(op, self._other) if isinstance(op, str) else self._other


def observe_serve_request(
    tags: dict[str, str], seconds: float, error: BaseException | None = None
) -> None:
    """One frame a replica served, as Serve counts a request: its time in the replica, and
    either the request counter or (a raised error) the error counter, never both. The count
    is summed here and given to Ray by ``flush_counts`` (as Serve's replica caches its own):
    one Ray record per frame instead of two."""
    _record_tags(SERVE_LATENCY, max(seconds, 0.0) * 1000, tags)
    if error is None:
        _count_later(SERVE_REQUESTS, tags)
    else:
        _count_later(SERVE_ERRORS, {**tags, "exception_type": type(error).__name__})


#: The longest a summed count waits for the next frame to flush it. Without frames, the
#: replica's health check flushes it (``ModelReplica.check_health``, every
#: ``placement.health_check_period_s``).
COUNTS_FLUSH_S = 1.0


def _count_later(spec: MetricSpec, tags: dict[str, str]) -> None:
    """+1 on a series, given to Ray with the others once ``COUNTS_FLUSH_S`` has passed."""
    _add_later(spec, tags, 1)


def _add_later(spec: MetricSpec, tags: dict[str, str], amount: int) -> None:
    """+``amount`` on a series, given to Ray with the others once ``COUNTS_FLUSH_S`` has
    passed."""
    key = (spec.name, tuple(tags.items()))
    with _lock:
        entry = _pending.get(key)
        if entry is None:
            _pending[key] = [spec, amount, tags]
        else:
            entry[1] += amount
        due = time.monotonic() - _flushed_at >= COUNTS_FLUSH_S
    if due:
        flush_counts()


def flush_counts() -> None:
    """Give Ray the counts summed since the last flush (a frame, the health check, exit)."""
    global _flushed_at
    with _lock:
        batch = list(_pending.values())
        _pending.clear()
        _flushed_at = time.monotonic()
    for spec, count, tags in batch:
        _record_tags(spec, count, tags)


def count_stalled_attempt(model: str, replica: str) -> None:
    """An ingress stopped waiting for ``replica`` on one request and tried another."""
    _record(STALLED_ATTEMPTS, 1, model=model, replica=replica)


def add_in_flight(model: str, delta: int) -> None:
    """+1 when a request starts in this process, -1 when it ends."""
    with _lock:  # held while recording, so the gauge never goes back to an older count
        count = max(_in_flight.get(model, 0) + delta, 0)
        _in_flight[model] = count
        _record(IN_FLIGHT, count, model=model)


def set_served_versions(model: str, replica: str, versions: list[str]) -> None:
    """The versions ``replica`` serves now; ones it served before and no longer do drop to 0."""
    now = {str(version) for version in versions}
    with _lock:
        before = _served.get((model, replica), set())
        _served[(model, replica)] = now
        for version in sorted(before - now):
            _record(SERVED_VERSION, 0, model=model, replica=replica, version=version)
        for version in sorted(now):
            _record(SERVED_VERSION, 1, model=model, replica=replica, version=version)


def count_load_failure(model: str, version: str) -> None:
    _record(LOAD_FAILURES, 1, model=model, version=version)


def count_swap(model: str, version: str) -> None:
    _record(SWAPS, 1, model=model, version=version)


def set_cpu_ops(model: str, version: str, count: int) -> None:
    """Ops of a loaded version that run on the CPU (a GPU host wants 0)."""
    _record(CPU_OPS, count, model=model, version=version)


def observe_warmup(model: str, version: str, source: str, requests: int, seconds: float) -> None:
    """One version's warm-up requests of one source (file or synthetic) and their time."""
    if requests > 0:  # a Ray counter refuses increments <= 0
        _record(WARMUP_REQUESTS, requests, model=model, version=version, source=source)
        _record(WARMUP_SECONDS, max(seconds, 1e-9), model=model, version=version, source=source)


def set_mps_daemon(node: str, up: bool, clients: int) -> None:
    """The node's MPS control daemon as the guardian last saw it (NodeSampler)."""
    _record(MPS_UP, 1 if up else 0, node=node)
    _record(MPS_CLIENTS, clients, node=node, gpu="all")


def count_mps_restarts(node: str, restarts: int) -> None:
    """``restarts`` more restarts of the node's MPS daemon since the last count (NodeSampler)."""
    if restarts > 0:
        _record(MPS_RESTARTS, restarts, node=node)


def set_gpu(
    node: str,
    gpu: str,
    utilization_ratio: float,
    memory_used_bytes: int,
    memory_total_bytes: int,
    power_watts: float | None,
) -> None:
    """One GPU's load as NVML reads it (NodeSampler)."""
    _record(GPU_UTILIZATION, utilization_ratio, node=node, gpu=gpu)
    _record(GPU_MEMORY_USED, memory_used_bytes, node=node, gpu=gpu)
    _record(GPU_MEMORY_TOTAL, memory_total_bytes, node=node, gpu=gpu)
    if power_watts is not None:
        _record(GPU_POWER, power_watts, node=node, gpu=gpu)


def observe_embedding_lookup(
    model: str, seconds: float, ids: dict[str, tuple[int, int, int]]
) -> None:
    """One request's embedding lookup: its time, and per table (distinct ids requested,
    node-cache hits, fetched from the store), summed and flushed like Serve's counts."""
    _record(EMBEDDING_LOOKUP_DURATION, max(seconds, 0.0), model=model)
    for table, counts in ids.items():
        for level, count in zip(("requested", "node_cache", "store"), counts, strict=True):
            if count > 0:
                _add_later(EMBEDDING_IDS, {"model": model, "table": table, "level": level}, count)


def count_embedding_store_error(model: str) -> None:
    _record(EMBEDDING_STORE_ERRORS, 1, model=model)
