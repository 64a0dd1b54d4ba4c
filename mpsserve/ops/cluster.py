"""Which Ray cluster an ops command talks to, found the same way every time and said aloud.

``mpsserve serve`` records where its cluster is (``<state_dir>/clusters/<app>.json``, with its
metrics URL) and lists its metrics endpoints for Prometheus beside it
(``<app>.prometheus.json``, file_sd format);
``status`` and ``deploy`` take, in order: ``--address``, Ray's own ``RAY_ADDRESS`` (set for a
``ray job submit`` entrypoint), the record of the app while its Ray answers, the config's
``ray.address``. Never a bare "auto": on a machine with two clusters it picks one silently.
A dead address fails in seconds (a TCP probe before Ray is asked, a deadline on the join),
and a ``Watchdog`` ends the command on Ctrl-C or SIGTERM even while Ray's C++ code holds the
main thread, where Python's signal handlers never run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from mpsserve.errors import ClusterError
from mpsserve.node.control import alive
from mpsserve.settings import settings

logger = logging.getLogger(__name__)
DEFAULT_APP = "mpsserve"
_APP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
PROBE_TIMEOUT_S = 3.0
ADDRESS_HELP = (
    "Ray GCS address HOST:PORT (default: RAY_ADDRESS, else the cluster `mpsserve serve` "
    "recorded for the app, else the config's ray.address)"
)


@dataclass(frozen=True)
class ClusterRecord:
    """Where a running ``mpsserve serve`` keeps its app: written at start, removed at stop."""

    app_name: str
    address: str  # the GCS, host:port
    session_dir: str
    dashboard_url: str
    config_path: str
    pid: int
    started: float
    metrics_url: str = ""  # the ingress's GET /metrics (ingress.metrics_port); "" when off
    #: The local Ray's ports by setting name (``ray.dashboard_port``, ...), for a serve that
    #: started it; empty for one that joined a cluster.
    ray_ports: dict[str, int] = field(default_factory=dict)
    #: ``token`` or ``disabled`` for a local Ray; empty for a joined cluster.
    ray_auth_mode: str = ""

    @property
    def session_name(self) -> str:
        return Path(self.session_dir).name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterRecord:
        return cls(
            app_name=str(data["app_name"]),
            address=str(data["address"]),
            session_dir=str(data["session_dir"]),
            dashboard_url=str(data["dashboard_url"]),
            config_path=str(data["config_path"]),
            pid=int(data["pid"]),
            started=float(data["started"]),
            metrics_url=str(data.get("metrics_url") or ""),
            ray_ports={str(k): int(v) for k, v in (data.get("ray_ports") or {}).items()},
            ray_auth_mode=str(data.get("ray_auth_mode") or ""),
        )


def state_dir() -> Path:
    return Path(settings().state_dir or Path.home() / ".mpsserve")


def record_path(app_name: str) -> Path:
    if not _APP_NAME.match(app_name):
        raise ClusterError(f"app name {app_name!r}: use letters, digits, '_', '.', '-'")
    return state_dir() / "clusters" / f"{app_name}.json"


def write_record(record: ClusterRecord) -> Path:
    """Atomically: a reader sees the old record or the new one, never half of one."""
    path = record_path(record.app_name)
    _write_atomically(path, asdict(record))
    return path


def _write_atomically(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def discovery_path(app_name: str) -> Path:
    """The app's Prometheus file_sd targets, beside its record (``clusters/*.prometheus.json``
    is what deployments/prometheus/prometheus.yml reads)."""
    return record_path(app_name).with_name(f"{app_name}.prometheus.json")


def discovery_groups(app_name: str, targets: list[str]) -> list[dict[str, Any]]:
    """file_sd's format: one group, this app's metrics endpoints, labelled with the app."""
    return [{"targets": sorted(set(targets)), "labels": {"app": app_name}}] if targets else []


def write_discovery(app_name: str, targets: list[str]) -> Path:
    """List the app's metrics endpoints (``host:port`` of every node's ingress metrics port)
    for Prometheus; atomically, as Prometheus may read it at any time."""
    path = discovery_path(app_name)
    _write_atomically(path, discovery_groups(app_name, targets))
    return path


def read_record(app_name: str) -> ClusterRecord | None:
    path = record_path(app_name)
    try:
        return ClusterRecord.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the unreadable cluster record %s: %s", path, exc)
        return None


def remove_record(app_name: str, pid: int) -> bool:
    """Remove the app's record if process ``pid`` wrote it (a later serve's stays)."""
    record = read_record(app_name)
    if record is None or record.pid != pid:
        return False
    record_path(app_name).unlink(missing_ok=True)
    discovery_path(app_name).unlink(missing_ok=True)  # Prometheus drops the targets with it
    return True


def endpoint(address: str) -> tuple[str, int] | None:
    """``host:port`` of a Ray address (``ray://`` too); None for "auto" and "local"."""
    if address in ("auto", "local"):
        return None
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S, starting_s: float = 0.0) -> None:
    """Fail in seconds where nothing listens, rather than in Ray's minutes of retries. A
    refused connection is tried again for ``starting_s``: a head that ``ray start`` is still
    bringing up refuses for a few seconds before it listens."""
    where = endpoint(address)
    if where is None:
        return
    deadline = time.monotonic() + starting_s
    while True:
        try:
            with socket.create_connection(where, timeout=timeout_s):
                return
        except ConnectionRefusedError as exc:
            if time.monotonic() >= deadline:
                raise _nothing_at(address, exc.strerror or str(exc)) from exc
            time.sleep(0.25)
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise _nothing_at(address, reason) from exc


def _nothing_at(address: str, reason: str) -> ClusterError:
    return ClusterError(
        f"no Ray cluster at {address}: {reason}; is Ray running there? pass the GCS "
        "address of a running cluster (`ray status` prints it; 6379 is Ray's default port)"
    )


def answers(record: ClusterRecord) -> bool:
    """The record's serve process lives and its GCS accepts a connection."""
    if not alive(record.pid):
        return False
    try:
        probe(record.address, timeout_s=1.0)
    except ClusterError:
        return False
    return True


@dataclass(frozen=True)
class Target:
    """The cluster an ops command joins, and where that address came from."""

    address: str
    source: str
    app_name: str


def ray_address_env() -> str:
    """Ray's own knob (not ours, so not in settings): ``ray job submit`` sets it."""
    return os.environ.get("RAY_ADDRESS", "")


def resolve(
    app_name: str,
    explicit: str | None,
    config_address: str | None = None,
    config_path: str | None = None,
) -> Target:
    """The address to join, in the order the module docstring gives; ClusterError if none."""
    if explicit:
        return Target(explicit, "--address", app_name)
    if ray_address_env():
        return Target(ray_address_env(), "RAY_ADDRESS", app_name)
    record = read_record(app_name)
    if record is not None and answers(record):
        return Target(record.address, f"the record {record_path(app_name)}", app_name)
    if record is not None:
        gone = f"ignoring {record_path(app_name)}: its serve (pid {record.pid}) or Ray is gone"
        print(gone, file=sys.stderr)
    if config_address:
        return Target(config_address, f"ray.address of {config_path}", app_name)
    raise ClusterError(
        f"no Ray cluster known for app {app_name!r}: no running `mpsserve serve` recorded one "
        f"in {record_path(app_name)}"
        + (f" and {config_path} sets no ray.address" if config_path else "")
        + "; pass --address HOST:PORT (the cluster's GCS address), or --app NAME of a served app"
    )


def join(
    target: Target,
    timeout_s: float | None = None,
    watchdog: Watchdog | None = None,
    starting_s: float = 0.0,
) -> Any:
    """``ray.init`` on the target after a probe (``starting_s``: see ``probe``), under a
    deadline; returns Ray's context."""
    import ray

    timeout_s = settings().connect_timeout_s if timeout_s is None else timeout_s
    probe(target.address, min(PROBE_TIMEOUT_S, timeout_s), starting_s)
    if watchdog is not None:
        watchdog.arm(timeout_s, f"no Ray answered at {target.address} within {timeout_s:g} s")
    try:
        return ray.init(address=target.address, logging_level=logging.WARNING)
    finally:
        if watchdog is not None:
            watchdog.disarm()


def cluster_line(target: Target, address_info: dict[str, Any]) -> str:
    """The one line an ops command prints before its report."""
    gcs = address_info.get("gcs_address") or target.address
    session = Path(str(address_info.get("session_dir") or "?")).name
    return f"cluster {gcs} (session {session}), app {target.app_name!r}; from {target.source}"


class Watchdog:
    """Ends the process ``grace_s`` after SIGINT or SIGTERM, or when an armed deadline
    passes, whatever the main thread is doing. Signals reach it through Python's wakeup fd,
    which the C-level handler writes even while the main thread never returns to Python."""

    def __init__(self, command: str, grace_s: float = 2.0) -> None:
        self.command, self.grace_s = command, grace_s
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._deadline: tuple[float, str] | None = None
        self._signalled: tuple[float, int] | None = None
        self._done = threading.Event()
        self._previous_fd = -1
        self._thread = threading.Thread(target=self._run, name="mpsserve-watchdog", daemon=True)

    def arm(self, seconds: float, message: str) -> None:
        self._deadline = (time.monotonic() + seconds, message)

    def disarm(self) -> None:
        self._deadline = None

    def __enter__(self) -> Watchdog:
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        if self._signalled is None:  # after a signal it keeps counting: shutdown may hang
            self._done.set()

    def _run(self) -> None:
        while not self._done.is_set():
            ready, _, _ = select.select([self._read], [], [], 0.2)
            if ready:
                self._note(os.read(self._read, 64))
            self._check(time.monotonic())
        os.close(self._read)
        os.close(self._write)

    def _note(self, received: bytes) -> None:
        signals = [n for n in received if n in (signal.SIGINT, signal.SIGTERM)]
        if signals and self._signalled is None:
            self._signalled = (time.monotonic(), signals[0])

    def _check(self, now: float) -> None:
        if self._signalled is not None and now - self._signalled[0] >= self.grace_s:
            number = self._signalled[1]
            self._exit(128 + number, f"stopped by {signal.Signals(number).name}")
        if self._deadline is not None and now >= self._deadline[0]:
            self._exit(2, self._deadline[1])

    def _exit(self, code: int, message: str) -> None:
        print(f"mpsserve {self.command}: {message}", file=sys.stderr, flush=True)
        os._exit(code)
