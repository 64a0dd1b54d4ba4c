"""Status as ``mpsserve status --json`` reports it, and what a healthy report is per case."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpsserve.config import load_config


@dataclass(frozen=True)
class Poll:
    started: float  # time.monotonic() when the report was asked for
    report: dict[str, Any]


def watch_status(config_path: str, address: str | None, poll_s: float) -> None:
    """Child mode: a JSON line per poll: ``{"started": t, "report": <mpsserve status --json>}``."""
    config = load_config(config_path)
    has_token = Path.home().joinpath(".ray", "auth_token").exists()
    if has_token and "RAY_AUTH_MODE" not in os.environ:  # as `mpsserve status` joins
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    from mpsserve.ops.status import gather

    target = address or config.ray.address or "auto"
    ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
    parent = os.getppid()
    while os.getppid() == parent:  # an orphan stops polling
        started = time.monotonic()
        try:
            report = gather(config.ray.app_name)
        except Exception as exc:  # the cluster being unwell is what we measure
            report = {"ok": False, "verdict": f"status failed: {type(exc).__name__}: {exc}"}
        print(json.dumps({"started": started, "report": report}, default=str), flush=True)
        time.sleep(max(0.0, poll_s - (time.monotonic() - started)))


class StatusWatcher:
    def __init__(self, args: argparse.Namespace) -> None:
        command = [sys.executable, "-m", "benchmarks.fault_matrix", "--watch-status"]
        command += ["--config", str(args.config), "--poll-s", str(args.poll_s)]
        command += ["--address", args.address] if args.address else []
        repo = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open while the child runs)
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        self.polls: list[Poll] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                doc = json.loads(line)
                self.polls.append(Poll(doc["started"], doc["report"]))

    def since(self, start: float) -> list[Poll]:
        return [p for p in list(self.polls) if p.started >= start]

    def first(self, timeout_s: float) -> Poll:
        deadline = time.monotonic() + timeout_s
        while not self.polls:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"no status report; status child said:\n{self.log.read()}")
            time.sleep(0.2)
        return self.polls[-1]

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


# ---------------------------------------------------------------------------------------------
# What healthy means


@dataclass(frozen=True)
class Expect:
    model: str
    replicas: int
    ingresses: int
    version: str | None = None  # None: any single version
    gone: frozenset[int] = frozenset()  # killed pids that must no longer be listed
    rejected: str | None = None  # a version every replica must report as failed


def model_rows(report: dict[str, Any], model: str) -> list[dict[str, Any]]:
    return [r for r in report.get("replicas") or [] if r.get("model") == model]


def served(report: dict[str, Any], model: str) -> set[str]:
    rows = model_rows(report, model)
    return {",".join(r.get("versions") or []) or "-" for r in rows if "error" not in r}


def problems(report: dict[str, Any], expect: Expect) -> list[str]:
    """Why a status report is not healthy for ``expect`` (empty: healthy)."""
    found = [] if report.get("ok") else [str(report.get("verdict"))]
    rows, ingresses = model_rows(report, expect.model), report.get("ingresses") or []
    if len(rows) != expect.replicas or len(ingresses) != expect.ingresses:
        found.append(f"{len(rows)} replicas, {len(ingresses)} ingresses")
    if silent := [r["pid"] for r in rows if "error" in r]:
        found.append(f"replicas {silent} do not answer")
    versions_now = served(report, expect.model)
    if len(versions_now) > 1 or (expect.version and versions_now != {expect.version}):
        found.append(f"serving {sorted(versions_now)}")
    pids = {r.get("pid") for r in rows} | {i.get("pid") for i in ingresses}
    daemons = {n.get("daemon_pid") for n in (report.get("mps_nodes") or {}).values()}
    if listed := (pids | daemons) & expect.gone:
        found.append(f"killed pid(s) {sorted(map(str, listed))} still listed")
    if expect.rejected:
        pending = [r["pid"] for r in rows if expect.rejected not in failed_versions(r)]
        if pending:
            found.append(f"version {expect.rejected} not refused yet by {pending}")
    return found


def failed_versions(row: dict[str, Any]) -> dict[str, Any]:
    return (row.get("store") or {}).get("failed") or {}


def recovery_s(
    polls: list[Poll], expect: Expect, failures: list[float], t0: float, now: float, quiet_s: float
) -> float | None:
    """Time to recover (module docstring); None when not (yet) recovered."""
    streak: float | None = None
    for poll in polls:
        healthy = not problems(poll.report, expect)
        streak = (streak if streak is not None else poll.started) if healthy else None
    if streak is None:
        return None
    recovered = max(streak, *failures) if failures else streak
    return round(recovered - t0, 2) if now - recovered >= quiet_s else None
