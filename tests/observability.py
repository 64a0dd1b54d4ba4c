"""Shared by the metrics tests: where to find a real Prometheus, and the dashboard's queries.

``make`` installs Prometheus into the venv (see the Makefile); elsewhere the tests look on PATH
or at $MPSSERVE_PROMETHEUS_BIN, and skip without one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deployments" / "grafana" / "mpsserve-dashboard.json"
PROMETHEUS_YML = ROOT / "deployments" / "prometheus" / "prometheus.yml"
#: A prometheus binary to use instead of searching (promtool is looked for beside it).
BIN_ENV = "MPSSERVE_PROMETHEUS_BIN"


def find(tool: str = "prometheus") -> str | None:
    """``prometheus`` or ``promtool``: at/beside $MPSSERVE_PROMETHEUS_BIN, on PATH, in the venv."""
    configured = os.environ.get(BIN_ENV)
    if configured:
        beside = Path(configured).with_name(tool)
        return str(beside) if beside.is_file() else None
    return shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's panels, rows left out (a collapsed row holds its panels)."""
    found = []
    for panel in dashboard["panels"]:
        found += [panel, *panel.get("panels", [])]
    return [p for p in found if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(load_dashboard()) for t in p["targets"]]


#: Ray's metrics agent exports every 10 s by default.
REPORT_INTERVAL_S = 10.0


def settled(count: Callable[[], float], deadline_s: float = 60.0) -> float:
    """A counter's value once Ray has exported everything earlier tests sent: equal across
    one report interval (or whatever it is at the deadline)."""
    deadline = time.monotonic() + deadline_s
    value = count()
    while True:
        time.sleep(REPORT_INTERVAL_S + 1)
        again = count()
        if again == value or time.monotonic() > deadline:
            return again
        value = again


def reaches(count: Callable[[], float], want: float, deadline_s: float = 40.0) -> float:
    """The counter's value once it reaches ``want`` (or at the deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        got = count()
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(1)


@contextlib.contextmanager
def running_prometheus(binary: str, config_file: Path, tmp_path: Path, port: int) -> Iterator[str]:
    """A real Prometheus on ``config_file``, listening on loopback ``port``, its data and log
    under ``tmp_path``; yields its URL, stops it (by its pid) and prints its log if it failed."""
    log = tmp_path / "prometheus.log"
    args = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
    if proc.returncode not in (0, -15):
        print(log.read_text())
