"""Closed-loop load generator for mpsserve's KServe v2 endpoints (HTTP binary tensors or gRPC).

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --concurrency 8,16,32 --label mps
    python -m benchmarks.loadgen --grpc 127.0.0.1:9000 --concurrency 8,16,32 --label mps
    python -m benchmarks.loadgen --url https://127.0.0.1:8000 --token-file TOKENS --ca-file CA.pem
        [--cert-file CLIENT.pem --key-file CLIENT.key]   # with ingress.auth / ingress.tls on

``--processes`` client processes (multiprocessing spawn) each run an asyncio loop; a step of
concurrency C gives process i ``C // P`` workers (plus one for the first ``C % P``). A worker
sends a request, waits for the reply, and sends the next one. Every step is a warm-up
(``--warmup-s``, not counted) followed by a measured window (``--duration-s``); the processes
share one schedule on the system-wide monotonic clock, so all of them switch from warm-up to
measurement at the same instant.

Counting: a request belongs to the window when its reply arrives inside it (it may have been
sent during the warm-up). ``requests`` counts the good replies, ``errors`` the failed ones (HTTP
status, gRPC status, transport error, or a score tensor of the wrong size); ``qps`` is
``requests / duration_s``; latencies are those of the counted requests. Workers stop sending at
the window's end and let their request in flight finish (uncounted), so the next step starts on
a drained server.

CPU accounting (both divided by ``requests``):

* ``client_cpu_s_per_req``: each client process reads ``getrusage(RUSAGE_SELF)`` (user + sys,
  all its threads) at the window's start and end; the deltas are summed. The coordinating
  process (progress, sampling) is not included.
* ``server_cpu_s_per_req``: at the window's start and end the coordinator reads utime + stime
  from ``/proc/<pid>/stat`` of every process whose ``/proc/<pid>/cmdline`` matches
  ``--server-pids-pattern`` (the load generator's own processes excluded). A process seen at
  both ends contributes its delta; one started during the window contributes all its time; one
  that existed but was not matched (or not readable) at the start is skipped; one that exited
  during the window is lost (its time since the start cannot be read any more; its parent's
  ``cutime`` is not used because it would add the child's whole life). Children's time is thus
  under- rather than over-counted. Only processes on this host are seen: the number is
  meaningful when the server runs here. ``null`` when /proc is missing or nothing matches.

* ``role_cpu_s_per_req``: the same server CPU split by role, a process's role being the first
  of ``ROLES`` whose pattern its command line matches (``model``: the model replicas,
  ``ingress``: the ingress replicas, ``ray``: Ray's own daemons and actors), else ``other``.
* ``machine_cpu_s_per_req``: every core's busy time (``/proc/stat``'s first line, all but
  idle and iowait) over the window: server, clients, and anything else the host runs.

``gpu_util_pct`` is the median of NVML's GPU-0 utilisation sampled every 0.2 s during the
window (``null`` without NVML or a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import re
import resource
import shlex
import signal
import socket
import ssl
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from mpsserve.ops.demo import DemoSpec, ZipfIds, make_request
from mpsserve.protocol.kserve import HEADER_LENGTH

DEFAULT_SERVER_PATTERN = r"ray::|raylet|gcs_server|mpsserve"
#: Server process roles for ``role_cpu_s_per_req``: the first pattern a command line matches.
ROLES = (
    ("model", re.compile(r"ServeReplica:mpsserve:model-")),
    ("ingress", re.compile(r"ServeReplica:mpsserve:ingress")),
    ("ray", re.compile(r"ray::|raylet|gcs_server|dashboard|ServeController")),
)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
START_DELAY_S = 0.5  # a step starts this long after its plan is sent to the clients
ERROR_BACKOFF_S = 0.01  # a worker pauses after a failure so a dead server is not spun on
GPU_SAMPLE_S = 0.2
SEED_STRIDE = 10_000  # request k of process i is make_request(seed=i * SEED_STRIDE + k)
DATATYPES = {"float32": "FP32", "float64": "FP64", "int32": "INT32", "int64": "INT64"}
VERSIONED_PACKAGES = ("mpsserve", "numpy", "aiohttp", "grpcio", "protobuf", "nvidia-ml-py")

#: Keys of every step in the results file.
STEP_KEYS = (
    "label",
    "protocol",
    "rows",
    "concurrency",
    "processes",
    "duration_s",
    "requests",
    "errors",
    "qps",
    "mean_ms",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "gpu_util_pct",
    "client_cpu_s_per_req",
    "server_cpu_s_per_req",
    "machine",
    "started_at",
)
MARKDOWN_HEADER = (
    "| scenario | rows | concurrency | QPS | mean ms | P95 ms | P99 ms | errors | GPU % "
    "| server CPU ms/req (model, ingress) | client CPU ms/req | machine CPU ms/req |"
)


# ---------------------------------------------------------------------------------------------
# Shared between the coordinator and the client processes (all picklable)


@dataclass(frozen=True)
class ClientConfig:
    protocol: str  # "http" or "grpc"
    target: str  # base URL or host:port
    model: str
    rows: int
    table_rows: int
    requests: int
    timeout_s: float
    token: str | None = None  # sent as "Authorization: Bearer ..." (ingress.auth)
    ca_file: str | None = None  # TLS: the CA of the server's certificate (ingress.tls)
    cert_file: str | None = None  # mutual TLS: this client's certificate and key
    key_file: str | None = None
    zipf_ids: int | None = None  # ids from this many distinct ones, Zipf-skewed (else uniform)
    zipf_exponent: float = 1.05

    def ssl_context(self) -> ssl.SSLContext | None:
        """The HTTPS client context, for an https:// URL."""
        if not self.target.startswith("https://"):
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def read_token(path: str) -> str:
    """The first token of a token file (the server's format: comments and not_after allowed)."""
    for line in Path(path).read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            return fields[0]
    raise SystemExit(f"{path} holds no token")


@dataclass(frozen=True)
class StepPlan:
    workers: int
    start: float  # time.monotonic() values, valid in every process of this host
    window_start: float
    window_end: float


@dataclass
class ClientResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    warmup_errors: int = 0
    cpu_s: float = 0.0
    error_sample: str | None = None


# ---------------------------------------------------------------------------------------------
# Targets: build request bodies once, send them many times


class Target(Protocol):
    def prepare(self, request: dict[str, np.ndarray]) -> Any: ...

    async def open(self) -> None: ...

    async def send(self, body: Any) -> str | None:
        """Send one request; None when the reply is good, else what was wrong."""
        ...

    async def close(self) -> None: ...


def wire_datatype(array: np.ndarray) -> str:
    return DATATYPES[array.dtype.name]


def little_endian_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def http_body(request: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A v2 binary-tensor body (JSON header + raw inputs) and its HTTP headers."""
    inputs, chunks = [], []
    for name, array in request.items():
        raw = little_endian_bytes(array)
        inputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": wire_datatype(array),
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        chunks.append(raw)
    doc = {"inputs": inputs, "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return header + b"".join(chunks), headers


def check_http_reply(payload: bytes, header_length: str | None, rows: int) -> str | None:
    """None when the body holds a binary FP32 ``score`` of ``rows`` elements."""
    if header_length is None:
        return "reply has no binary outputs (no Inference-Header-Content-Length)"
    try:
        n = int(header_length)
        outputs = json.loads(payload[:n])["outputs"]
        sizes = {o["name"]: o.get("parameters", {}).get("binary_data_size") for o in outputs}
        datatypes = {o["name"]: o.get("datatype") for o in outputs}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"malformed reply header: {exc!r}"
    if sizes.get("score") != rows * 4 or datatypes.get("score") != "FP32":
        return (
            f"score: {sizes.get('score')} bytes of {datatypes.get('score')}, want {rows * 4} FP32"
        )
    if len(payload) - n != sum(s for s in sizes.values() if isinstance(s, int)):
        return "reply body length does not match its binary_data_size"
    return None


class HttpTarget:
    def __init__(self, config: ClientConfig) -> None:
        self.url = f"{config.target.rstrip('/')}/v2/models/{config.model}/infer"
        self.rows = config.rows
        self.timeout_s = config.timeout_s
        self.session: Any = None
        self.ssl = config.ssl_context()
        self.auth = {"Authorization": f"Bearer {config.token}"} if config.token else {}

    def prepare(self, request: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        body, headers = http_body(request)
        return body, {**headers, **self.auth}

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=self.ssl if self.ssl else True),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        )

    async def send(self, body: tuple[bytes, dict[str, str]]) -> str | None:
        data, headers = body
        async with self.session.post(self.url, data=data, headers=headers) as reply:
            payload = await reply.read()
            if reply.status != 200:
                return f"HTTP {reply.status}: {payload[:200]!r}"
            return check_http_reply(payload, reply.headers.get(HEADER_LENGTH), self.rows)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class GrpcTarget:
    """KServe v2 gRPC with mpsserve's generated stubs (imported here, never at module level)."""

    def __init__(self, config: ClientConfig) -> None:
        import grpc

        from mpsserve.protocol import grpc_service_pb2, grpc_service_pb2_grpc

        self.grpc: Any = grpc
        self.pb: Any = grpc_service_pb2
        self.pb_grpc: Any = grpc_service_pb2_grpc
        self.address = config.target
        self.model = config.model
        self.rows = config.rows
        self.timeout_s = config.timeout_s
        self.channel: Any = None
        self.stub: Any = None
        self.config = config

    def credentials(self) -> Any:
        """TLS channel credentials when a CA or client certificate is given, else None."""
        config = self.config
        if not (config.ca_file or config.cert_file):
            return None
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return self.grpc.ssl_channel_credentials(
            read(config.ca_file), read(config.key_file), read(config.cert_file)
        )

    def prepare(self, request: dict[str, np.ndarray]) -> Any:
        message = self.pb.ModelInferRequest(model_name=self.model)
        for name, array in request.items():
            message.inputs.add(name=name, datatype=wire_datatype(array), shape=list(array.shape))
            message.raw_input_contents.append(little_endian_bytes(array))
        return message

    async def open(self) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        credentials = self.credentials()
        if credentials is None:
            self.channel = self.grpc.aio.insecure_channel(self.address, options=options)
        else:
            self.channel = self.grpc.aio.secure_channel(self.address, credentials, options=options)
        self.stub = self.pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def send(self, body: Any) -> str | None:
        try:
            reply = await self.stub.ModelInfer(
                body, timeout=self.timeout_s, metadata=self.config.metadata()
            )
        except self.grpc.aio.AioRpcError as exc:
            return f"gRPC {exc.code().name}: {exc.details()}"
        if not reply.raw_output_contents:
            return "reply has no raw_output_contents"
        size = len(reply.raw_output_contents[0])
        return None if size == self.rows * 4 else f"score: {size} bytes, want {self.rows * 4}"

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


def make_target(config: ClientConfig) -> Target:
    return GrpcTarget(config) if config.protocol == "grpc" else HttpTarget(config)


# ---------------------------------------------------------------------------------------------
# Client process


class StepStats:
    """What one client process saw in one step, by the time each reply arrived."""

    def __init__(self, plan: StepPlan, counters: Any, index: int) -> None:
        self.plan = plan
        self.counters = counters  # shared array: [good, failed] per process, for progress
        self.index = index
        self.result = ClientResult()

    def record(self, sent: float, done: float, error: str | None) -> None:
        self.counters[2 * self.index + (0 if error is None else 1)] += 1
        if error is not None:
            self.result.error_sample = self.result.error_sample or error[:300]
        if done < self.plan.window_start:
            if error is not None:
                self.result.warmup_errors += 1
        elif done <= self.plan.window_end:
            if error is None:
                self.result.latencies_s.append(done - sent)
            else:
                self.result.errors += 1


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def worker(target: Target, bodies: list[Any], first: int, stats: StepStats) -> None:
    await sleep_until(stats.plan.start)
    k = first
    while (sent := time.monotonic()) < stats.plan.window_end:
        try:
            error = await target.send(bodies[k % len(bodies)])
        except Exception as exc:  # any failure of one request is an error, not a crash
            error = f"{type(exc).__name__}: {exc}"
        stats.record(sent, time.monotonic(), error)
        k += 1
        if error is not None:
            await asyncio.sleep(ERROR_BACKOFF_S)


async def measure_cpu(stats: StepStats) -> None:
    await sleep_until(stats.plan.window_start)
    before = cpu_seconds()
    await sleep_until(stats.plan.window_end)
    stats.result.cpu_s = cpu_seconds() - before


async def run_client_step(
    target: Target, bodies: list[Any], plan: StepPlan, counters: Any, index: int
) -> ClientResult:
    stats = StepStats(plan, counters, index)
    workers = [worker(target, bodies, w, stats) for w in range(plan.workers)]
    await asyncio.gather(measure_cpu(stats), *workers)
    return stats.result


async def client_loop(index: int, config: ClientConfig, conn: Connection, counters: Any) -> None:
    target = make_target(config)
    spec = DemoSpec(table_rows=config.table_rows)
    seeds = [index * SEED_STRIDE + k for k in range(config.requests)]
    ids = ZipfIds(config.zipf_ids, config.zipf_exponent) if config.zipf_ids else None
    bodies = [target.prepare(make_request(spec, config.rows, seed, ids)) for seed in seeds]
    await target.open()
    try:
        conn.send(("ready", None))
        while (plan := await asyncio.to_thread(conn.recv)) is not None:
            result = await run_client_step(target, bodies, plan, counters, index)
            conn.send(("result", result))
    finally:
        await target.close()


def client_process(index: int, config: ClientConfig, conn: Connection, counters: Any) -> None:
    """Entry point of a client process: serve step plans until told to stop (None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C
    try:
        asyncio.run(client_loop(index, config, conn, counters))
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("failed", traceback.format_exc()))


# ---------------------------------------------------------------------------------------------
# Coordinator: the client pool


def split_concurrency(concurrency: int, processes: int) -> list[int]:
    """Workers per process: as even as possible, the remainder to the first processes."""
    base, extra = divmod(concurrency, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


class ClientPool:
    def __init__(self, config: ClientConfig, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.counters: Any = ctx.Array("q", 2 * processes, lock=False)
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(processes):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=client_process, args=(i, config, theirs, self.counters), daemon=True
            )
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs if p.pid is not None}

    def receive(self, i: int, timeout: float, want: str) -> Any:
        if not self.conns[i].poll(max(0.0, timeout)):
            raise RuntimeError(f"client process {i} sent no {want} within {timeout:.0f} s")
        try:
            kind, payload = self.conns[i].recv()
        except EOFError:
            raise RuntimeError(f"client process {i} exited unexpectedly") from None
        if kind != want:
            raise RuntimeError(f"client process {i} failed:\n{payload}")
        return payload

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        for i in range(len(self.conns)):
            self.receive(i, deadline - time.monotonic(), "ready")

    def start_step(self, workers: list[int], start: float, window: tuple[float, float]) -> None:
        for i in range(len(self.counters)):
            self.counters[i] = 0
        for conn, n in zip(self.conns, workers, strict=True):
            conn.send(StepPlan(n, start, *window))

    def collect(self, timeout: float) -> list[ClientResult]:
        deadline = time.monotonic() + timeout
        return [
            self.receive(i, deadline - time.monotonic(), "result") for i in range(len(self.conns))
        ]

    def totals(self) -> tuple[int, int]:
        values = list(self.counters)
        return sum(values[0::2]), sum(values[1::2])

    def close(self, graceful: bool = True) -> None:
        """Stop the clients: asked to (between steps), or terminated (after a failure)."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=10 if graceful else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Coordinator: server CPU, GPU utilisation, machine


@dataclass
class ProcSnapshot:
    """utime + stime (ticks) of matching processes, keyed by (pid, start time) against pid reuse."""

    uptime_ticks: float
    ticks: dict[tuple[int, int], int]
    roles: dict[tuple[int, int], str]
    machine_busy_ticks: int | None


def role_of(cmdline: str) -> str:
    return next((name for name, pattern in ROLES if pattern.search(cmdline)), "other")


def machine_busy_ticks() -> int | None:
    """Busy ticks of every core since boot (``/proc/stat``: all but idle and iowait)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]) - fields[3] - fields[4]


def read_proc_stat(pid: str) -> tuple[int, int]:
    """(start time, utime + stime) in clock ticks from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold ")"
    return int(fields[19]), int(fields[11]) + int(fields[12])


def snapshot_server(pattern: re.Pattern[str], exclude: set[int]) -> ProcSnapshot | None:
    """CPU ticks of every readable process whose command line matches; None without /proc."""
    try:
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        entries = os.listdir("/proc")
    except OSError:
        return None
    ticks: dict[tuple[int, int], int] = {}
    roles: dict[tuple[int, int], str] = {}
    for pid in filter(str.isdigit, entries):
        if int(pid) in exclude:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            text = cmdline.decode("utf-8", "replace")
            if pattern.search(text):
                start, cpu = read_proc_stat(pid)
                ticks[(int(pid), start)] = cpu
                roles[(int(pid), start)] = role_of(text)
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
    return ProcSnapshot(uptime_s * os.sysconf("SC_CLK_TCK"), ticks, roles, machine_busy_ticks())


def server_cpu_by_role(
    before: ProcSnapshot | None, after: ProcSnapshot | None
) -> dict[str, float] | None:
    """CPU seconds the matching processes spent between two snapshots, per role (see the
    module doc)."""
    if before is None or after is None or not after.ticks:
        return None
    total: dict[str, int] = {}
    for key, ticks in after.ticks.items():
        if key in before.ticks:
            spent = ticks - before.ticks[key]
        elif key[1] >= before.uptime_ticks:  # started during the window
            spent = ticks
        else:
            continue
        role = after.roles[key]
        total[role] = total.get(role, 0) + spent
    return {role: n / os.sysconf("SC_CLK_TCK") for role, n in sorted(total.items())}


def machine_cpu_seconds(before: ProcSnapshot | None, after: ProcSnapshot | None) -> float | None:
    if before is None or after is None:
        return None
    if before.machine_busy_ticks is None or after.machine_busy_ticks is None:
        return None
    return (after.machine_busy_ticks - before.machine_busy_ticks) / os.sysconf("SC_CLK_TCK")


class Gpu:
    """GPU 0 through NVML; every method degrades to None without NVML or a GPU."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.nvml = pynvml
        except Exception:  # no library, no driver, no device
            self.handle = None

    def name(self) -> str | None:
        if self.handle is None:
            return None
        name = self.nvml.nvmlDeviceGetName(self.handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def utilization(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        except self.nvml.NVMLError:  # e.g. not supported on a MIG slice
            return None


@contextlib.contextmanager
def sample_gpu(gpu: Gpu, samples: list[int]) -> Iterator[None]:
    """Append GPU-0 utilisation to ``samples`` every 0.2 s while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            value = gpu.utilization()
            if value is not None:
                samples.append(value)
            if stop.wait(GPU_SAMPLE_S):
                return

    thread = threading.Thread(target=loop, daemon=True)
    if gpu.handle is not None:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


def machine_info(gpu: Gpu) -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "gpu": gpu.name()}


# ---------------------------------------------------------------------------------------------
# Coordinator: one step


class Progress:
    """A ``\\r``-updated status line on stderr, once a second."""

    def __init__(self, title: str, pool: ClientPool, stream: TextIO = sys.stderr) -> None:
        self.title = title
        self.pool = pool
        self.stream = stream
        self.base = (0, 0)
        self.last = (time.monotonic(), 0)

    def run_until(self, deadline: float, phase: str, phase_start: float) -> None:
        while (now := time.monotonic()) < deadline:
            time.sleep(min(1.0, deadline - now))
            self.show(phase, time.monotonic() - phase_start, deadline - phase_start)

    def mark_window_start(self) -> None:
        self.base = self.pool.totals()

    def show(self, phase: str, elapsed: float, length: float) -> None:
        done, errors = self.pool.totals()
        now = time.monotonic()
        qps = (done - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, done)
        line = (
            f"\r[{self.title}] {phase:<7} {max(elapsed, 0):5.1f}/{length:g}s "
            f"requests {done - self.base[0]:>7}  qps {qps:8.1f}  errors {errors - self.base[1]}"
        )
        self.stream.write(line.ljust(100))
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def percentiles_ms(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"mean_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    arr = np.asarray(latencies_s) * 1000.0
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "mean_ms": round(float(arr.mean()), 3),
        "p50_ms": round(float(p50), 3),
        "p95_ms": round(float(p95), 3),
        "p99_ms": round(float(p99), 3),
    }


def per_request(total: float | None, requests: int) -> float | None:
    return None if total is None or requests == 0 else round(total / requests, 6)


@dataclass
class Window:
    """What the coordinator measured around one step's window."""

    started_at: str
    gpu_samples: list[int]
    server_cpu_s: dict[str, float] | None  # per role
    machine_cpu_s: float | None
    server_processes: int
    results: list[ClientResult]


def run_step(args: argparse.Namespace, pool: ClientPool, gpu: Gpu, concurrency: int) -> Window:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    pattern, exclude = re.compile(args.server_pids_pattern), {os.getpid(), *pool.pids}
    start = time.monotonic() + START_DELAY_S
    window = (start + args.warmup_s, start + args.warmup_s + args.duration_s)
    pool.start_step(split_concurrency(concurrency, args.processes), start, window)
    progress = Progress(f"{args.label} {args.protocol} c={concurrency}", pool)
    progress.run_until(window[0], "warmup", start)
    before = snapshot_server(pattern, exclude)
    progress.mark_window_start()
    samples: list[int] = []
    with sample_gpu(gpu, samples):
        progress.run_until(window[1], "measure", window[0])
    after = snapshot_server(pattern, exclude)
    progress.finish()
    results = pool.collect(args.timeout_s + 60)
    matched = len(after.ticks) if after else 0
    return Window(
        started_at,
        samples,
        server_cpu_by_role(before, after),
        machine_cpu_seconds(before, after),
        matched,
        results,
    )


def step_report(
    args: argparse.Namespace, concurrency: int, window: Window, machine: dict[str, Any]
) -> dict[str, Any]:
    latencies = [x for r in window.results for x in r.latencies_s]
    requests = len(latencies)
    samples = [e for r in window.results if (e := r.error_sample)]
    return {
        "label": args.label,
        "protocol": args.protocol,
        "rows": args.rows,
        "concurrency": concurrency,
        "processes": min(args.processes, concurrency),
        "duration_s": args.duration_s,
        "requests": requests,
        "errors": sum(r.errors for r in window.results),
        "qps": round(requests / args.duration_s, 2),
        **percentiles_ms(latencies),
        "gpu_util_pct": statistics.median(window.gpu_samples) if window.gpu_samples else None,
        "client_cpu_s_per_req": per_request(sum(r.cpu_s for r in window.results), requests),
        "server_cpu_s_per_req": per_request(
            None if window.server_cpu_s is None else sum(window.server_cpu_s.values()), requests
        ),
        "role_cpu_s_per_req": None
        if window.server_cpu_s is None
        else {role: per_request(s, requests) for role, s in window.server_cpu_s.items()},
        "machine_cpu_s_per_req": per_request(window.machine_cpu_s, requests),
        "machine": machine,
        "started_at": window.started_at,
        "warmup_s": args.warmup_s,
        "warmup_errors": sum(r.warmup_errors for r in window.results),
        "server_processes": window.server_processes,
        "error_sample": samples[0] if samples else None,
    }


# ---------------------------------------------------------------------------------------------
# Results file and markdown


def step_key(step: dict[str, Any]) -> tuple[Any, ...]:
    return (step["label"], step["protocol"], step["rows"], step["concurrency"])


def merge_steps(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with steps of the same (label, protocol, rows, concurrency) replaced by ``new``."""
    fresh = {step_key(s): s for s in new}
    merged = [fresh.pop(step_key(s), s) for s in old]
    return merged + [s for s in new if step_key(s) in fresh]


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def run_meta(
    args: argparse.Namespace, argv: Sequence[str], machine: dict[str, Any]
) -> dict[str, Any]:
    command = shlex.join([sys.executable, "-m", "benchmarks.loadgen", *argv])
    return {
        "command": command,
        "argv": list(argv),
        "python": sys.version,
        "versions": versions(),
        "machine": machine,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "labels": {args.label: command},
    }


def write_results(path: Path, steps: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Merge ``steps`` into the results file (created if missing); returns the whole document."""
    doc: dict[str, Any] = {"steps": [], "meta": {}}
    if path.exists():
        doc = json.loads(path.read_text())
    labels = {**doc.get("meta", {}).get("labels", {}), **meta["labels"]}
    doc = {"steps": merge_steps(doc.get("steps", []), steps), "meta": {**meta, "labels": labels}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return doc


def cell(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.2f}"


def _server_cpu_cell(step: dict[str, Any]) -> str:
    roles = step.get("role_cpu_s_per_req") or {}
    split = ", ".join(_ms(roles.get(role)) for role in ("model", "ingress"))
    return (
        f"{_ms(step['server_cpu_s_per_req'])} ({split})"
        if roles
        else _ms(step["server_cpu_s_per_req"])
    )


def markdown_row(step: dict[str, Any]) -> str:
    cells = [
        f"{step['label']} ({step['protocol']})",
        str(step["rows"]),
        str(step["concurrency"]),
        cell(step["qps"]),
        cell(step["mean_ms"], ".2f"),
        cell(step["p95_ms"], ".2f"),
        cell(step["p99_ms"], ".2f"),
        str(step["errors"]),
        cell(step["gpu_util_pct"], ".0f"),
        _server_cpu_cell(step),
        _ms(step["client_cpu_s_per_req"]),
        _ms(step.get("machine_cpu_s_per_req")),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(steps: list[dict[str, Any]]) -> str:
    rule = "|" + "---|" * MARKDOWN_HEADER.count(" | ") + "---|"
    return "\n".join([MARKDOWN_HEADER, rule, *map(markdown_row, steps)]) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def concurrency_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrencies must be positive integers")
    return values


def positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text}")
        return value

    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Closed-loop KServe v2 load (HTTP or gRPC) at a sweep of concurrencies.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="HTTP base URL, e.g. http://127.0.0.1:8000")
    target.add_argument("--grpc", help="gRPC address, e.g. 127.0.0.1:9000")
    p.add_argument("--model", default="rec", help="model name on the server")
    p.add_argument("--rows", type=positive(int), default=2000, help="rows per request")
    p.add_argument("--table-rows", type=positive(int), default=100_000, help="DemoSpec.table_rows")
    p.add_argument(
        "--concurrency", type=concurrency_list, default="8,16,32", help="one step per value"
    )
    p.add_argument("--duration-s", type=positive(float), default=15.0, help="measured window")
    p.add_argument("--warmup-s", type=float, default=3.0, help="uncounted, before each step")
    p.add_argument("--processes", type=positive(int), default=8, help="client processes")
    p.add_argument("--requests", type=positive(int), default=16, help="bodies per process")
    p.add_argument("--label", default="mps", help="scenario name in the results")
    p.add_argument(
        "--out", type=Path, default=Path("results.json"), help="merged into if it exists"
    )
    p.add_argument("--markdown", type=Path, help="write a table of every step in --out")
    p.add_argument(
        "--server-pids-pattern",
        default=DEFAULT_SERVER_PATTERN,
        help="regex on /proc/<pid>/cmdline of the server processes (CPU accounting)",
    )
    p.add_argument("--timeout-s", type=positive(float), default=60.0, help="per request")
    p.add_argument(
        "--zipf-ids",
        type=positive(int),
        help="draw ids from this many distinct ones, Zipf-skewed as real traffic is (for "
        "embedding caches); default: uniform over the whole id space",
    )
    p.add_argument(
        "--zipf-exponent",
        type=positive(float),
        default=1.05,
        help="the skew of --zipf-ids (default: %(default)s)",
    )
    p.add_argument("--token-file", help="ingress.auth: send the first token of this file")
    p.add_argument("--ca-file", help="ingress.tls: the CA of the server's certificate")
    p.add_argument("--cert-file", help="mutual TLS: this client's certificate (PEM)")
    p.add_argument("--key-file", help="mutual TLS: this client's key (PEM)")
    args = p.parse_args(argv)
    if args.warmup_s < 0:
        p.error("--warmup-s must be >= 0")
    try:
        re.compile(args.server_pids_pattern)
    except re.error as exc:
        p.error(f"--server-pids-pattern: {exc}")
    args.protocol = "grpc" if args.grpc else "http"
    return args


def client_config(args: argparse.Namespace) -> ClientConfig:
    return ClientConfig(
        protocol=args.protocol,
        target=args.grpc or args.url,
        model=args.model,
        rows=args.rows,
        table_rows=args.table_rows,
        requests=args.requests,
        timeout_s=args.timeout_s,
        token=read_token(args.token_file) if args.token_file else None,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        zipf_ids=args.zipf_ids,
        zipf_exponent=args.zipf_exponent,
    )


def summary(step: dict[str, Any]) -> str:
    return (
        f"{step['label']} {step['protocol']} c={step['concurrency']}: {step['qps']} qps, "
        f"p50 {step['p50_ms']} ms, p99 {step['p99_ms']} ms, errors {step['errors']}"
        + (f" (first: {step['error_sample']})" if step["error_sample"] else "")
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    gpu = Gpu()
    machine = machine_info(gpu)
    pool = ClientPool(client_config(args), args.processes)
    steps = []
    try:
        pool.wait_ready()
        for concurrency in args.concurrency:
            window = run_step(args, pool, gpu, concurrency)
            steps.append(step_report(args, concurrency, window, machine))
            print(summary(steps[-1]), flush=True)
    except BaseException:
        pool.close(graceful=False)
        raise
    pool.close()
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        steps = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"\nload generator failed: {exc}", file=sys.stderr)
        return 1
    doc = write_results(args.out, steps, run_meta(args, argv, steps[0]["machine"]))
    print(f"results: {args.out}", flush=True)
    if args.markdown:
        args.markdown.write_text(markdown_table(doc["steps"]))
        print(f"markdown: {args.markdown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
