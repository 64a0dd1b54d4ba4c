"""The service configuration: one YAML file, validated here, where it enters.

A bad file fails at load with the dotted path of the bad field and what was expected
(``models.0.placement.replicas_per_gpu: Input should be greater than or equal to 1``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mpsserve.errors import ConfigError
from mpsserve.tokens import read_token_env, read_token_file

#: MPS accepts at most this many client processes per GPU on Volta and later.
MPS_MAX_CLIENTS_PER_GPU = 48

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VersionPolicy(_Strict):
    """Which versions of a model serve (TF Serving's policies); only `latest` is wired so far."""

    latest: int | None = Field(1, ge=1, description="Serve the newest N complete versions.")
    specific: list[int] | None = Field(
        None, min_length=1, description="Serve exactly these versions (pins)."
    )

    @model_validator(mode="after")
    def _one_policy(self) -> VersionPolicy:
        if self.specific is not None and self.latest not in (None, 1):
            raise ValueError("give either 'latest' or 'specific', not both")
        return self

    def text(self) -> str:
        """``latest 1`` or ``specific [1, 2]``: how logs, errors and redeploys name it."""
        if self.specific is not None:
            return f"specific {self.specific}"
        return f"latest {self.latest or 1}"

    def selected(self, complete: Sequence[int]) -> list[int]:
        """The versions this policy serves of the ``complete`` ones, ascending: the pinned
        ones (those not complete yet left out), else the newest ``latest``."""
        if self.specific is not None:
            return sorted(set(self.specific) & set(complete))
        return sorted(complete)[-(self.latest or 1) :]

    def candidates(self, complete: Sequence[int]) -> list[int]:
        """Every version worth serving, best first, for a process that serves one at a time
        and takes the first that loads: the pinned ones, highest first, else every complete
        version, newest first (older ones in case the newest fails), so that whatever a
        process loaded before, the outcome is the same in every process."""
        if self.specific is not None:
            return sorted(set(self.specific) & set(complete), reverse=True)
        return sorted(complete, reverse=True)


class Placement(_Strict):
    """How a model's replicas are placed on GPUs (fractional) or CPUs."""

    replicas_per_gpu: int = Field(
        4, ge=1, le=MPS_MAX_CLIENTS_PER_GPU, description="Replica processes sharing each GPU."
    )
    gpu_share: float = Field(
        1.0, gt=0, le=1, description="Fraction of each GPU this model's replicas take together."
    )
    gpus: int | Literal["auto"] = Field(
        "auto", description="GPUs to spread over; 'auto' = every GPU in the Ray cluster."
    )
    cpu_replicas: int = Field(1, ge=1, description="Replicas when the cluster has no GPU.")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs reserved per replica.")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests queued per replica.")
    health_check_period_s: float = Field(
        5.0, gt=0, description="How often Ray Serve asks each replica whether it is healthy."
    )
    health_check_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long Ray Serve waits for a replica's health check; three missed in a "
        "row and Serve replaces it, so a frozen process goes in ~3 x this (Serve's default 30 s "
        "would take 90 s).",
    )
    inference_stall_s: float = Field(
        60.0,
        gt=0,
        description="A request running this long in a replica's inference thread fails its "
        "health check (a hung runtime or GPU); Serve then replaces the replica. Loading and "
        "warming a version happen on another thread and do not count.",
    )

    def num_gpus_per_replica(self) -> float:
        """Ray's ``num_gpus`` for one replica: its slice of the GPU's share."""
        return self.gpu_share / self.replicas_per_gpu


class ModelConfig(_Strict):
    """One served model: where its versions live and how to run them."""

    name: Annotated[str, Field(pattern=_NAME.pattern, description="URL-safe model name.")]
    store: str = Field(description="Base URI of numbered versions: file://, s3://, a path.")
    runtime: Literal["tensorflow", "torch"] = Field("tensorflow", description="Model runtime.")
    signature: str = Field("serving_default", description="SavedModel signature to serve.")
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    poll_interval_s: float = Field(
        30.0, gt=0, description="How often replicas look for new versions in the store."
    )
    done_marker: str | None = Field(
        None, description="A file the publisher writes last; versions without it are skipped."
    )
    warmup_rows: int = Field(
        8,
        ge=0,
        description="Rows of the synthetic warm-up request; 0 turns it off. A version that "
        "ships a TF Serving warm-up file (assets.extra/tf_serving_warmup_requests) is warmed "
        "with its requests instead.",
    )
    max_rows: int = Field(16384, ge=1, description="Most rows accepted in one request.")
    intra_op_threads: int = Field(0, ge=0, description="Runtime intra-op threads; 0 = auto.")
    inter_op_threads: int = Field(0, ge=0, description="Runtime inter-op threads; 0 = auto.")
    cpu_fallback: Literal["warn", "fail"] = Field(
        "warn",
        description="Ops with no GPU kernel for their dtype (see `mpsserve audit-ops`): warn "
        "logs them and serves; fail refuses to load such a version.",
    )
    custom_op_libraries: list[str] = Field(
        default_factory=list,
        description="TensorFlow custom op libraries (.so) loaded before the model; relative "
        "paths resolve from the config file.",
    )
    cuda_graphs: bool = Field(
        True,
        description="PyTorch on a GPU: replay CUDA graphs captured per padded request shape "
        "(rows and ragged values rounded up to buckets; each row scored on its own).",
    )
    tf32: bool = Field(
        False,
        description="PyTorch on a GPU: TF32 matmuls, as TensorFlow does by default on Ampere and "
        "later (faster; scores differ from fp32 by ~1e-3).",
    )
    placement: Placement = Field(default_factory=Placement)


class IngressLimits(_Strict):
    """What one ingress replica accepts from peers it does not trust: every wait has a
    timeout, every size and count a bound, and load beyond them is refused at once (a quick
    503 or RESOURCE_EXHAUSTED the client can retry elsewhere) rather than queued."""

    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection must deliver a request's line and headers within this time "
        "(from connecting, or from the first byte of a request after a keep-alive pause); "
        "a slowloris gets 408 and is closed. Also gRPC's handshake deadline.",
    )
    body_idle_timeout_s: float = Field(
        10.0,
        gt=0,
        description="While a request body is being received, bytes must keep arriving: a "
        "silence this long gets 408 and the connection closed.",
    )
    keepalive_timeout_s: float = Field(
        75.0,
        gt=0,
        description="An idle keep-alive HTTP connection is closed after this long. Above the "
        "60 s idle timeout of common load balancers, so they never reuse a connection we closed.",
    )
    max_header_kb: int = Field(
        32,
        ge=1,
        le=1024,
        description="Most bytes of a request line and headers (HTTP) or of a call's metadata "
        "(gRPC), in KiB; more gets 431 and a closed connection.",
    )
    max_headers: int = Field(
        100, ge=1, description="Most header fields in one HTTP request; more gets 431."
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="Most open HTTP connections per ingress replica; beyond it a new "
        "connection gets 503 with Retry-After and is closed. Lowered at start to 80% of the "
        "process's file limit (RLIMIT_NOFILE, whose soft value is raised to the hard one), so "
        "file descriptors are never exhausted.",
    )
    max_grpc_connections: int = Field(
        1024,
        ge=1,
        description="Most open gRPC connections per ingress replica (grpc's "
        "max_allowed_incoming_connections); counted in the same file budget.",
    )
    max_in_flight_requests: int = Field(
        256,
        ge=1,
        description="Most inference requests one ingress replica holds at once (HTTP and gRPC "
        "together, queued for a model replica or running); beyond it a request is refused at "
        "once with 503 + Retry-After (gRPC: UNAVAILABLE) instead of waiting in a queue. About "
        "the model replicas' max_ongoing_requests in all, times a few, per ingress replica.",
    )
    retry_after_s: int = Field(
        1, ge=0, description="The Retry-After a shed request (503) is given, in seconds."
    )
    grpc_max_concurrent_streams: int = Field(
        100, ge=1, description="Most RPCs at once on one gRPC connection (HTTP/2 streams)."
    )
    grpc_idle_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A gRPC connection with no RPC for this long is closed (GOAWAY).",
    )
    grpc_max_connection_age_s: float | None = Field(
        None,
        gt=0,
        description="Close gRPC connections this old (GOAWAY, RPCs in flight get 30 s to "
        "finish), so long-lived clients rebalance over ingress replicas; null: never.",
    )
    grpc_keepalive_s: float = Field(
        60.0,
        gt=0,
        description="The server pings a gRPC connection silent this long, and closes it when "
        "the ping is not answered within 20 s (a vanished peer).",
    )
    grpc_min_ping_interval_s: float = Field(
        10.0,
        gt=0,
        description="Keepalive enforcement: a client pinging more often than this (twice in a "
        "row) is sent GOAWAY.",
    )


#: Validation context key: check that the files (and environment variables) the config
#: names exist and are readable here. Off where a config is loaded for another machine
#: (``mpsserve serve-config``, ``deploy``, the app builder on an arbitrary cluster node).
CHECK_FILES = "check_files"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


def _checking_files(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(CHECK_FILES))


def _readable(path: str | None, info: ValidationInfo) -> str | None:
    """``path`` when it can be opened for reading here (only under CHECK_FILES)."""
    if path is None or not _checking_files(info):
        return path
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


def _as_value_error(read: Callable[[str], object], source: str) -> None:
    """Run ``read``; its ConfigError as the ValueError pydantic reports with the field path."""
    try:
        read(source)
    except ConfigError as exc:
        raise ValueError(exc.message) from None


class IngressAuth(_Strict):
    """Bearer tokens on both public ports: HTTP ``Authorization: Bearer TOKEN``, gRPC
    ``authorization`` metadata ``Bearer TOKEN``. Checked before a request's body is read;
    a request without an accepted token gets 401 (gRPC UNAUTHENTICATED). Tokens come from a
    file or an environment variable named here, never from this YAML. Format (both): one token
    per line, 16+ characters of ``A-Za-z0-9-._~+/=``, optionally followed by
    ``not_after=2027-01-31T00:00:00Z`` (refused from that instant); ``#`` starts a comment.
    Several lines are accepted at once, which is how a token is rotated without downtime."""

    token_file: str | None = Field(
        None,
        description="File of accepted tokens (a mounted Secret). Re-read when it changes "
        "(checked at most every reload_interval_s), so adding or removing a line takes "
        "effect without a restart; a file that cannot be read or parsed keeps the last good "
        "set (logged). Relative paths resolve from the config file.",
    )
    token_env: str | None = Field(
        None,
        pattern=_ENV_NAME,
        description="Name of an environment variable holding accepted tokens (the file's "
        "format, lines separated by newlines), read once when the ingress starts: rotating "
        "it needs a restart. Set in the environment of the Ray nodes running the ingress.",
    )
    exempt_health: bool = Field(
        True,
        description="Health probes pass without a token: GET /v2/health/live, "
        "/v2/health/ready, /-/healthz and gRPC ServerLive/ServerReady, so a kubelet or load "
        "balancer needs none. They tell only whether the server is up and ready.",
    )
    reload_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often, at most, the token file's status is checked for a change "
        "(a stat() on the request path; the file is read only when it changed).",
    )

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and _checking_files(info):
            _as_value_error(read_token_file, value)  # says which line is malformed
        return value

    @field_validator("token_env")
    @classmethod
    def _token_env(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and _checking_files(info):
            _as_value_error(read_token_env, value)
        return value

    @model_validator(mode="after")
    def _some_source(self) -> IngressAuth:
        if self.token_file is None and self.token_env is None:
            raise ValueError("give token_file, token_env or both (auth: null turns auth off)")
        return self


class IngressTls(_Strict):
    """TLS on both public ports (HTTPS and gRPC over TLS 1.2+), from PEM files (a mounted
    Secret); with ``client_ca_file``, mutual TLS. Files are checked at config load and
    parsed when the ingress starts; a changed certificate takes effect when ingress
    replicas restart (a redeploy)."""

    cert_file: str = Field(
        description="PEM certificate chain the ingress presents, its own certificate first."
    )
    key_file: str = Field(description="PEM private key of cert_file, unencrypted.")
    client_ca_file: str | None = Field(
        None,
        description="Mutual TLS: PEM bundle of the CAs whose client certificates are "
        "accepted; a client without such a certificate fails the handshake (HTTP and gRPC, "
        "health probes included). Null: clients present none.",
    )

    @field_validator("cert_file", "key_file", "client_ca_file")
    @classmethod
    def _files(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _readable(value, info)


class IngressConfig(_Strict):
    """The HTTP and gRPC front door."""

    host: str = Field("0.0.0.0", description="Address the HTTP proxy binds.")
    http_port: int = Field(8000, ge=1, le=65535, description="KServe v2 / TF-Serving REST port.")
    grpc_port: int = Field(9000, ge=1, le=65535, description="KServe v2 gRPC port.")
    replicas: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Ingress replicas, or 'auto': as many as the model deployments have "
        "replicas (an ingress costs about as much CPU per request as a model replica: measured "
        "1.6-1.7 ms each on the reference workload), capped by the CPUs the model replicas "
        "leave free, and never fewer than two, so none is a single point of failure: on one "
        "node they share the HTTP and gRPC ports (SO_REUSEPORT), so a killed, crashed or "
        "redeployed replica loses only its own in-flight requests while the others listen.",
    )
    cpus_per_replica: float = Field(
        0.5,
        ge=0,
        description="Ray CPUs reserved per ingress replica (a scheduling reservation, not a "
        "cap). 0.5: the default service, one 1-CPU model replica and two ingresses, fits a "
        "2-CPU machine; raise it where ingresses should own whole cores under heavy load.",
    )
    max_request_mb: float = Field(64.0, gt=0, description="Largest request body accepted.")
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request deadline.")
    attempt_timeout_min_s: float = Field(
        1.0,
        gt=0,
        description="Floor of the per-attempt timeout. An attempt on a model replica that has "
        "not answered within max(this, attempt_timeout_p99_factor x the model's recent P99 at "
        "this ingress) is stalled: the replica is set aside and the request sent to another one "
        "as well (the first answer wins). The floor keeps a slow first request (TensorFlow's "
        "first call, a CUDA-graph capture) from being duplicated within milliseconds.",
    )
    attempt_timeout_p99_factor: float = Field(
        4.0,
        ge=1,
        description="Per-attempt timeout as a multiple of the model's recent P99 exchange time "
        "(the last 256 answers at this ingress); it grows with the latency under overload, so "
        "stalls (and extra attempts) stay rare unless a replica stops answering.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Most attempts of one request running at once, each on a different replica "
        "(1: never send a request to a second replica while the first is silent).",
    )
    replica_set_aside_s: float = Field(
        10.0,
        gt=0,
        description="How long a replica that failed or stalled stays out of rotation; one that "
        "stalled is back as soon as the stalled attempt answers.",
    )
    api_docs: bool = Field(
        False,
        description="Serve FastAPI's pages (/openapi.json, /docs, /redoc). Off: they list "
        "every route to anyone who asks and are no part of the inference API.",
    )
    metrics_port: int | None = Field(
        8002,
        ge=1,
        le=65535,
        description="Port of GET /metrics (Prometheus text format; 8002 as Triton's): the "
        "service's series (ray_mpsserve_*, and Ray Serve's ray_serve_* of this app) from every "
        "process of the node, read from the node's Ray metrics agent. Every ingress replica of "
        "a node answers it (SO_REUSEPORT). Plain HTTP without a token, like Triton's and Ray's "
        "own metrics ports: bind it where only Prometheus reaches (metrics_host). null: off.",
    )
    metrics_host: str | None = Field(
        None, description="Address the metrics port binds; null = the ingress's host."
    )
    limits: IngressLimits = Field(default_factory=IngressLimits)
    auth: IngressAuth | None = Field(
        None,
        description="Bearer-token authentication on both ports; null (the default): none, "
        "any client that reaches the ports may infer.",
    )
    tls: IngressTls | None = Field(
        None,
        description="TLS (and optionally mutual TLS) on both ports; null (the default): "
        "plain HTTP and insecure gRPC.",
    )
    repository_api: bool = Field(
        False,
        description="Serve the model repository extension's load and unload (Triton's "
        "POST /v2/repository/models/{name}/load and /unload, gRPC RepositoryModelLoad and "
        "RepositoryModelUnload): an admin surface that changes what every replica serves "
        "until the next deploy. Off: they answer 403 / PERMISSION_DENIED. The index is "
        "always served. Protect it with ingress.auth where clients are not all admins.",
    )
    grpc_reflection: bool = Field(
        False,
        description="gRPC server reflection on the gRPC port (grpcurl, Postman list and "
        "describe its services without the .proto files). Off: it lists the API to anyone.",
    )

    @model_validator(mode="after")
    def _metrics_port_apart(self) -> IngressConfig:
        if self.metrics_port is not None and self.metrics_port in (self.http_port, self.grpc_port):
            raise ValueError(
                f"metrics_port {self.metrics_port} is also the HTTP or gRPC port; give it its own"
            )
        return self


class TransportConfig(_Strict):
    """The data port between the ingress and the model replicas: who may connect, how long
    a connection may sit, how large a frame may be. Frames are authenticated with a key the
    application generates at each build (see ``serving.transport``); these are the bounds."""

    bind_host: str | None = Field(
        None,
        description="Address each model replica's data port binds; null = the node's address "
        "as Ray reports it (ray.util.get_node_ip_address()). Never 0.0.0.0 by default: the "
        "port is internal and should be reachable only on the network Ray uses.",
    )
    handshake_timeout_s: float = Field(
        2.0,
        gt=0,
        description="A new connection must prove it holds the application's key within this "
        "long, or it is closed; nothing else is read from it before.",
    )
    idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A connection with no frame in progress and no request running is closed "
        "after this long; the ingress retires its pooled connections at half of it.",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Inside a frame, bytes must keep arriving: a connection that sends none "
        "for this long is closed.",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="Open connections per model replica (authenticated or not); more are "
        "closed at once. An ingress opens one per request in flight to the replica.",
    )
    max_header_kb: int = Field(
        64, ge=1, le=1024, description="Largest frame header (JSON) a replica accepts."
    )
    max_response_mb: float = Field(
        64.0,
        gt=0,
        description="Largest answer a replica sends and an ingress reads; a larger one becomes "
        "an error. Request frames are bounded by ingress.max_request_mb.",
    )


class MpsLimits(_Strict):
    """Per-replica MPS limits; None derives a default from replicas_per_gpu (N)."""

    active_thread_percentage: float | None = Field(
        None,
        gt=0,
        le=100,
        description="CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per replica (share of the GPU's SMs one "
        "replica may use); default 100: measured on an H100 with 8 replicas, 100 served 14% "
        "more requests than 25 at a lower P99 (benchmarks/results/2026-11-26-h100-speed.md).",
    )
    pinned_mem_limit_mb: int | None = Field(
        None,
        ge=1,
        description="CUDA_MPS_PINNED_DEVICE_MEM_LIMIT per replica, in MB; default: the GPU's "
        "memory x gpu_share / N, read from NVML on the node.",
    )

    def thread_percentage(self, replicas_per_gpu: int) -> float:
        if self.active_thread_percentage is not None:
            return self.active_thread_percentage
        return 100.0


class MpsConfig(_Strict):
    """CUDA MPS: whether replicas share each GPU through a control daemon."""

    mode: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: MPS when the node has GPUs; on: required; off: never."
    )
    daemon: Literal["managed", "external"] = Field(
        "managed",
        description="managed: mpsserve starts the node's control daemon (Ray hooks) and its "
        "guardian restarts it; external: someone else runs it (a host DaemonSet, NVIDIA's "
        "device plugin): mpsserve attaches, reports it down, and never starts or restarts it.",
    )
    pipe_dir: str = Field("/tmp/mpsserve/mps-pipe", description="CUDA_MPS_PIPE_DIRECTORY.")
    log_dir: str = Field("/tmp/mpsserve/mps-log", description="CUDA_MPS_LOG_DIRECTORY.")
    state_dir: str = Field(
        "/tmp/mpsserve/mps-state", description="Locks and the guardian's state file, per node."
    )
    control_binary: str = Field(
        "nvidia-cuda-mps-control", description="The MPS control program (name or path)."
    )
    guardian_interval_s: float = Field(
        2.0, gt=0, description="How often each node's guardian checks the control daemon."
    )
    command_timeout_s: float = Field(
        5.0, gt=0, description="Deadline for one try of a command to the control daemon."
    )
    command_retry_s: float = Field(
        5.0,
        gt=0,
        description="How long one exchange with the control daemon may take in all while it "
        "is busy (refusing commands or slow to answer, e.g. many replicas starting): refused "
        "and timed-out tries are repeated with backoff within it, then the daemon is reported "
        "busy, which never fails a replica's health check. Below every model's "
        "placement.health_check_timeout_s.",
    )
    limits: MpsLimits = Field(default_factory=MpsLimits)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object) -> object:
        """YAML 1.1 reads an unquoted `on` / `off` as true / false: take them as meant."""
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


class ReplicaMpsConfig(_Strict):
    """What one GPU replica needs of MPS: the service's ``mps`` section and its model's share
    of a GPU (for the derived pinned-memory limit). The app builder hands it to each replica
    as JSON in ``MPSSERVE_MPS_CONFIG`` (``mpsserve.node.hook.replica_runtime_env``), and the
    replica validates it with this model, so the MPS knobs are declared here once. Without
    one (a CPU replica, a process Serve did not start) MPS is off."""

    mps: MpsConfig = Field(
        default_factory=lambda: MpsConfig(mode="off"), description="The service's mps section."
    )
    replicas_per_gpu: int = Field(
        1, ge=1, le=MPS_MAX_CLIENTS_PER_GPU, description="The model's placement.replicas_per_gpu."
    )
    gpu_share: float = Field(1.0, gt=0, le=1, description="The model's placement.gpu_share.")

    @classmethod
    def from_json(cls, text: str) -> ReplicaMpsConfig:
        """Parse and validate ``MPSSERVE_MPS_CONFIG`` (empty: MPS off); ConfigError if bad."""
        try:
            return cls.model_validate_json(text or "{}")
        except ValidationError as exc:
            raise ConfigError(_describe(exc, "MPSSERVE_MPS_CONFIG")) from exc


#: Ray's default --min-worker-port and --max-worker-port: its workers take ports from here.
RAY_WORKER_PORTS = (10002, 19999)
#: RayConfig's port fields, each the ``ray start --head`` flag of the same name.
RAY_PORT_FIELDS = (
    "gcs_port",
    "dashboard_port",
    "dashboard_agent_listen_port",
    "dashboard_agent_grpc_port",
    "metrics_export_port",
    "ray_client_server_port",
    "runtime_env_agent_port",
    "node_manager_port",
    "object_manager_port",
)


def _ray_port(default: int | None, what: str) -> int | None:
    return Field(
        default,
        ge=1024,
        le=65535,
        description=f"Local Ray (ray.address null): port of {what}; null: a free port "
        "chosen at start. Checked free before Ray starts.",
    )


class RayConfig(_Strict):
    """Where Ray runs; ``address: null`` starts a local cluster for ``mpsserve serve``
    (``ray start --head`` with the ports below, stopped with the service)."""

    address: str | None = Field(None, description="Ray address to join; null = start local.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; null = all.")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs a local Ray declares; null = those it detects."
    )
    app_name: str = Field("mpsserve", description="Ray Serve application name.")
    dashboard: bool = Field(
        True, description="Start the Ray dashboard with a local Ray (needs its web client)."
    )
    dashboard_host: str = Field(
        "127.0.0.1",
        description="Local Ray: the address the dashboard (and its job server) listens on; "
        "0.0.0.0 for every interface.",
    )
    dashboard_port: int | None = _ray_port(
        8266,
        "the dashboard, its job server (`ray job submit --address http://HOST:PORT`) and "
        "Serve's REST API (`serve status --address`); not Ray's 8265, which a `ray start` "
        "cluster on the same machine keeps",
    )
    gcs_port: int | None = _ray_port(None, "the GCS, the cluster's address (HOST:PORT)")
    dashboard_agent_listen_port: int | None = _ray_port(
        None, "the dashboard agent's HTTP server, which runs submitted jobs (Ray's 52365)"
    )
    dashboard_agent_grpc_port: int | None = _ray_port(None, "the dashboard agent's gRPC server")
    metrics_export_port: int | None = _ray_port(
        None, "the node's Prometheus endpoint (Ray's metrics and mpsserve's, ray_ prefixed)"
    )
    ray_client_server_port: int | None = _ray_port(None, "the Ray Client server (Ray's 10001)")
    runtime_env_agent_port: int | None = _ray_port(None, "the runtime env agent")
    node_manager_port: int | None = _ray_port(None, "the raylet")
    object_manager_port: int | None = _ray_port(None, "the object manager")

    @model_validator(mode="after")
    def _check_ports(self) -> RayConfig:
        ports = self.ports()
        # a Serve config file carries every field: only a port other than its default counts
        given = [k for k, v in ports.items() if v != type(self).model_fields[k].default]
        if self.address is not None and given:
            raise ValueError(
                f"{', '.join(given)}: ports of the "
                "local Ray that `mpsserve serve` starts; with ray.address set it joins a "
                "cluster whose ports are its own (leave them out)"
            )
        taken: dict[int, str] = {}
        for name, port in ports.items():
            if port is None:
                continue
            if RAY_WORKER_PORTS[0] <= port <= RAY_WORKER_PORTS[1]:
                raise ValueError(
                    f"{name} {port} is in Ray's worker port range "
                    f"{RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[1]}; pick a port outside it"
                )
            if port in taken:
                raise ValueError(f"{name} and {taken[port]} are both {port}")
            taken[port] = name
        return self

    def ports(self) -> dict[str, int | None]:
        """The local Ray's port settings by field name (``None``: a free port at start)."""
        return {name: getattr(self, name) for name in RAY_PORT_FIELDS}

    def deployed(self) -> RayConfig:
        """What of this section the application itself runs with: its name. The rest says
        how ``mpsserve serve`` starts or joins a cluster, which a running application never
        reads; kept out of the application's args, a change there restarts no replica."""
        return RayConfig(app_name=self.app_name, dashboard_port=None)


_STORE_NODE = r"^[A-Za-z0-9_.\-]{1,253}:[0-9]{1,5}$|^\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}$"


class EmbeddingsConfig(_Strict):
    """The embedding tier's store: a Redis Cluster holding embedding rows by table, version
    tag and id (docs/embeddings.md). Credentials come from an environment variable or a file
    named here, never from this YAML, and are never logged. Absent: no embedding tier."""

    nodes: list[Annotated[str, Field(pattern=_STORE_NODE)]] = Field(
        min_length=1,
        description="Startup nodes of the cluster as host:port ([v6]:port); the client "
        "discovers the others (CLUSTER SLOTS), so any one reachable node is enough.",
    )
    username: str | None = Field(
        None, max_length=128, description="ACL user name; null: the default user."
    )
    password_env: str | None = Field(
        None,
        pattern=_ENV_NAME,
        description="Name of an environment variable holding the password (AUTH).",
    )
    password_file: str | None = Field(
        None,
        description="File holding the password (a mounted Secret; surrounding whitespace is "
        "ignored). Relative paths resolve from the config file.",
    )
    key_prefix: str = Field(
        "mpsserve",
        pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
        description="First part of every key, so several services can share one cluster.",
    )
    connect_timeout_s: float = Field(
        2.0, gt=0, description="Deadline to open a connection to one node."
    )
    command_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Deadline for one node to answer one command or pipeline; a shard that "
        "hangs fails the lookup after this, never later.",
    )
    retries: int = Field(
        1,
        ge=0,
        le=10,
        description="Times a failed command is retried after a topology refresh (a moved "
        "slot, a failover); 0 fails at the first error.",
    )
    batch_rows: int = Field(
        2000,
        ge=1,
        le=1_000_000,
        description="Rows written per pipelined round trip when publishing.",
    )
    node_cache_rows: int = Field(
        1 << 20,
        ge=0,
        le=1 << 30,
        description="Rows of each table of the served embedding version cached in host memory "
        "shared by every replica on the node (rounded down to a power of two, and never more "
        "than the table needs); 0: no node cache. Costs rows x (dim x 4 + 16) bytes per table.",
    )
    lease_ttl_s: float = Field(
        300.0,
        ge=10,
        description="How long a replica's lease on the embedding versions it serves lasts "
        "unless renewed (at each poll of its model store; at least 3 polls): `mpsserve "
        "embeddings gc` and `delete` keep leased versions, and a replica that died stops "
        "holding them after this.",
    )
    node_cache_dir: str = Field(
        "/dev/shm/mpsserve-embeddings",
        description="Where the node cache's files live (a tmpfs: /dev/shm); reserved in full "
        "when a version is loaded, so a full tmpfs is an error then (the replica serves "
        "without the node cache and says so), never later.",
    )

    @model_validator(mode="after")
    def _one_secret_source(self) -> EmbeddingsConfig:
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("give password_env or password_file, not both")
        return self

    @field_validator("password_file")
    @classmethod
    def _password_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _readable(value, info)

    @field_validator("password_env")
    @classmethod
    def _password_env(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and _checking_files(info) and not os.environ.get(value):
            raise ValueError(f"environment variable {value} is not set or empty")
        return value

    def password(self) -> str | None:
        """The password from its env var or file (ConfigError if it cannot be read)."""
        if self.password_env is not None:
            value = os.environ.get(self.password_env, "")
            if not value:
                raise ConfigError(f"embeddings.password_env: {self.password_env} is not set")
            return value
        if self.password_file is not None:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"embeddings.password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from exc
        return None


class ServiceConfig(_Strict):
    """The whole service."""

    models: list[ModelConfig] = Field(min_length=1, description="Models to serve.")
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    mps: MpsConfig = Field(default_factory=MpsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    embeddings: EmbeddingsConfig | None = Field(
        None, description="The embedding store (Redis Cluster); null: no embedding tier."
    )

    def as_deployed(self) -> ServiceConfig:
        """This config as a running application holds it, and as its Serve config reads
        back: the ``ray`` section reduced to what the application runs with
        (``RayConfig.deployed``)."""
        return self.model_copy(update={"ray": self.ray.deployed()})

    @model_validator(mode="after")
    def _check_models(self) -> ServiceConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        share = sum(m.placement.gpu_share for m in self.models)
        if share > 1.0 + 1e-9:
            raise ValueError(f"models' placement.gpu_share add up to {share:g}, more than 1 GPU")
        clients = sum(m.placement.replicas_per_gpu for m in self.models)
        if clients > MPS_MAX_CLIENTS_PER_GPU:
            raise ValueError(
                f"{clients} replicas per GPU in all; MPS allows at most "
                f"{MPS_MAX_CLIENTS_PER_GPU} clients per GPU"
            )
        self._check_mps_budget()
        self._check_ray_ports()
        return self

    def _check_ray_ports(self) -> None:
        """The local Ray's ports and the ingress's are bound on the same machine."""
        ingress = {
            "ingress.http_port": self.ingress.http_port,
            "ingress.grpc_port": self.ingress.grpc_port,
            "ingress.metrics_port": self.ingress.metrics_port,
        }
        for name, port in self.ray.ports().items():
            clash = [k for k, v in ingress.items() if port is not None and v == port]
            if clash and self.ray.address is None:
                raise ValueError(f"ray.{name} and {clash[0]} are both {port}")

    def _check_mps_budget(self) -> None:
        """A health check may ask a busy daemon for up to mps.command_retry_s; it must still
        answer within Serve's health-check timeout, or a busy daemon fails replicas."""
        if self.mps.mode == "off":
            return
        for m in self.models:
            if self.mps.command_retry_s >= m.placement.health_check_timeout_s:
                raise ValueError(
                    f"mps.command_retry_s ({self.mps.command_retry_s:g}) must be below model "
                    f"{m.name!r}'s placement.health_check_timeout_s "
                    f"({m.placement.health_check_timeout_s:g})"
                )

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


class SharedConfig(_Strict):
    """The service config less its models: what every deployment of the application shares,
    and what the Serve application's args carry (``serving.app``), while each model's own
    settings travel with its deployment, so that changing them restarts nothing else. Its
    fields are ServiceConfig's, models aside (a unit test keeps the two in step)."""

    ingress: IngressConfig = Field(default_factory=IngressConfig)
    mps: MpsConfig = Field(default_factory=MpsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    embeddings: EmbeddingsConfig | None = Field(
        None, description="The embedding store (Redis Cluster); null: no embedding tier."
    )

    @classmethod
    def of(cls, config: ServiceConfig) -> SharedConfig:
        return cls.model_validate(config.as_deployed().model_dump(exclude={"models"}))


def field_errors(error: ValidationError) -> list[str]:
    """Each of ``error``'s problems as ``path.to.field: message`` (``(top level)``: the whole)."""
    return [
        f"{'.'.join(str(p) for p in item['loc']) or '(top level)'}: {item['msg']}"
        for item in error.errors()
    ]


def _describe(error: ValidationError, source: str) -> str:
    return "\n".join([f"invalid config {source}:", *(f"  {e}" for e in field_errors(error))])


def parse_config(data: object, source: str = "<dict>", check_files: bool = True) -> ServiceConfig:
    """Validate already-parsed YAML/JSON data; raise ConfigError naming each bad field.
    ``check_files``: the token, certificate and key files must be readable here (False
    where the config is only passed on to the machines that run it)."""
    try:
        return ServiceConfig.model_validate(data, context={CHECK_FILES: check_files})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc


def parse_shared(data: object, source: str) -> SharedConfig:
    """Validate the shared sections (``SharedConfig``); ConfigError naming each bad field.
    Files are not looked for: the ingress checks them where it runs."""
    try:
        return SharedConfig.model_validate(data, context={CHECK_FILES: False})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc


def parse_model(text: str, source: str) -> ModelConfig:
    """A model's config from JSON (a replica's ``MPSSERVE_MODEL_CONFIG``); ConfigError if bad."""
    try:
        return ModelConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc


def load_config(path: str | Path, check_files: bool = True) -> ServiceConfig:
    """Read and validate a YAML config file; relative store, custom op library, token and
    certificate paths resolve from the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    return parse_config(_resolve_stores(data, path.parent), str(path), check_files)


#: The ingress's file fields: (section, field), resolved from the config file like stores.
_INGRESS_FILES = (
    ("auth", "token_file"),
    ("tls", "cert_file"),
    ("tls", "key_file"),
    ("tls", "client_ca_file"),
)


def _resolve_ingress_files(data: dict[str, object], base: Path) -> None:
    ingress = data.get("ingress")
    for section, name in _INGRESS_FILES:
        part = ingress.get(section) if isinstance(ingress, dict) else None
        if isinstance(part, dict) and isinstance(part.get(name), str):
            part[name] = _absolute_store(part[name], base)


def _resolve_stores(data: object, base: Path) -> object:
    """Make relative local paths absolute, so replicas on any cwd find them."""
    if isinstance(data, dict):
        _resolve_ingress_files(data, base)
        embeddings = data.get("embeddings")
        if isinstance(embeddings, dict) and isinstance(embeddings.get("password_file"), str):
            embeddings["password_file"] = _absolute_store(embeddings["password_file"], base)
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        return data
    for model in data["models"]:
        if isinstance(model, dict) and isinstance(model.get("store"), str):
            model["store"] = _absolute_store(model["store"], base)
        libraries = model.get("custom_op_libraries") if isinstance(model, dict) else None
        if isinstance(libraries, list):
            model["custom_op_libraries"] = [
                _absolute_store(p, base) if isinstance(p, str) else p for p in libraries
            ]
    return data


def _absolute_store(uri: str, base: Path) -> str:
    if "://" in uri and not uri.startswith("file://"):
        return uri
    local = uri.removeprefix("file://")
    return str((base / local).resolve()) if not Path(local).is_absolute() else local
