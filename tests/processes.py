"""Driving the ``mpsserve`` command line as a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """Everything the process printed up to the line holding ``marker``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise TimeoutError(f"no {marker!r} within {timeout_s}s; output:\n{''.join(seen)[-4000:]}")


@dataclass(frozen=True)
class Outcome:
    at: float  # time.monotonic() when the answer came
    ok: bool
    version: str | None  # the response's model_version
    sent: float = 0.0  # time.monotonic() when the request went out
    status: int = 0  # HTTP status; 0: no answer (connection error, client timeout)

    @property
    def seconds(self) -> float:
        return self.at - self.sent


class Load(threading.Thread):
    """Sends one request body in a loop, one at a time, and keeps every outcome."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            request = urllib.request.Request(self.url, data=self.body, method="POST")
            sent, status, version = time.monotonic(), 0, None
            try:
                with urllib.request.urlopen(request, timeout=40) as response:
                    status, version = response.status, _version(response.read())
            except urllib.error.HTTPError as exc:
                status = exc.code
            except Exception:
                pass
            outcome = Outcome(time.monotonic(), status == 200, version, sent, status)
            self.outcomes.append(outcome)

    def versions(self) -> list[str | None]:
        """The served versions in order, with repeats collapsed: ["1", "2"] for a swap."""
        runs: list[str | None] = []
        for outcome in self.outcomes:
            if not runs or runs[-1] != outcome.version:
                runs.append(outcome.version)
        return runs


def _version(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["model_version"])
    except (ValueError, KeyError):
        return None


#: The first port of Linux's default ephemeral range (net.ipv4.ip_local_port_range).
EPHEMERAL_PORTS_START = 32768


def service_config(
    store: Path,
    http_port: int,
    app_name: str,
    model_replicas: int = 1,
    ingress_replicas: int = 2,
    **model: Any,
) -> dict[str, Any]:
    """A small CPU service for ``Service``: fits a 2-CPU local Ray (0.5 CPU per replica);
    the gRPC port is the HTTP port + 1000, the metrics port the HTTP port + 1. ``model`` adds
    or overrides model fields. Every port stays below the kernel's ephemeral range, where an
    outgoing connection may hold any port (CI saw it: a gRPC port in use)."""
    assert http_port + 1000 < EPHEMERAL_PORTS_START, f"{http_port}: pick a lower port"
    return {
        "models": [
            {
                "name": "rec",
                "store": str(store),
                "intra_op_threads": 1,
                "placement": {"cpu_replicas": model_replicas, "cpus_per_replica": 0.5},
                **model,
            }
        ],
        "ray": {"num_cpus": 2, "dashboard": False, "app_name": app_name},
        "ingress": {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": http_port + 1000,
            "metrics_port": http_port + 1,
            "replicas": ingress_replicas,
            "cpus_per_replica": 0.5,
        },
        "transport": {"bind_host": "127.0.0.1"},  # data ports on loopback only
    }


#: The dashboard port of a test's own `mpsserve serve`: not the default 8266, which two
#: checkouts running the tier at once (MPSSERVE_TEST_PORT_OFFSET) would share.
SERVE_DASHBOARD_PORT = 24700 + int(os.environ.get("MPSSERVE_TEST_PORT_OFFSET", "0"))


def with_dashboard_port(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``ray.dashboard_port`` set, unless it sets one or joins a cluster."""
    ray = dict(config.get("ray") or {})
    if "address" not in ray:
        ray.setdefault("dashboard_port", SERVE_DASHBOARD_PORT)
    return {**config, "ray": ray}


class Service:
    """``mpsserve serve --config service.yaml`` in ``cwd``, as a user starts it: a context
    manager that waits for the banner and stops it with Ctrl-C (its own Ray goes with it)."""

    def __init__(
        self,
        cwd: Path,
        config: dict[str, Any],
        timeout_s: float = 300,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cwd, self.timeout_s, self.env = cwd, timeout_s, env or {}
        (cwd / "service.yaml").write_text(yaml.safe_dump(with_dashboard_port(config)))
        self.http_port = int(config["ingress"]["http_port"])
        self.address = ""
        self.banner = ""  # what it printed up to "Ctrl-C stops"
        self.output = ""
        self.returncode: int | None = None  # once stopped: 0 is a clean Ctrl-C
        self._proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v2/models"

    def __enter__(self) -> Service:
        self._proc = subprocess.Popen(
            [*CLI, "serve", "--config", "service.yaml", "--rows", "64"],
            cwd=self.cwd,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            banner = read_until(self._proc, "Ctrl-C stops", self.timeout_s)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.banner = banner
        found = re.search(r"Ray address:\s+(\S+)", banner)
        self.address = found.group(1) if found else ""
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)
        rest, _ = self._proc.communicate(timeout=120)
        self.output += rest
        self.returncode = self._proc.returncode

    def cli(
        self, *args: str, config: str = "service.yaml", timeout_s: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Another mpsserve command against this service's cluster."""
        return subprocess.run(
            [*CLI, *args, "--config", config, "--address", self.address],
            cwd=self.cwd,
            env={**os.environ, "RAY_ADDRESS": ""},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def status(self) -> dict[str, Any]:
        """``mpsserve status --json`` (any exit code: a problem is what tests look for)."""
        done = self.cli("status", "--json")
        report: dict[str, Any] = json.loads(done.stdout)
        report["exit_code"] = done.returncode
        return report

    def request_body(self, model: str = "rec") -> bytes:
        return (self.cwd / f".mpsserve/request-{model}.json").read_bytes()


CLI = [sys.executable, "-m", "mpsserve.ops.cli"]


def until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Wait for ``predicate`` to return something true; that value, or TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(0.3)
