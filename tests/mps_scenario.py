"""The MPS recovery scenario, run by the CPU integration tier against the stand-in daemon and
by the GPU tier against the real one: serve with ``mps.mode: on``, check that every replica
is a client of the daemon's server, SIGKILL the daemon under load, and watch the guardian
and Ray Serve's health checks bring every replica back as a client of the new server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mpsserve.node.control import MpsControl
from mpsserve.node.hook import CONTROL_LOCK_FILE
from tests.processes import Load, read_until

STATUS_WAIT_S = 90.0


@dataclass
class Observed:
    clients_before: dict[int, list[int]] = field(default_factory=dict)
    clients_after: dict[int, list[int]] = field(default_factory=dict)
    replicas_before: list[int] = field(default_factory=list)
    replicas_after: list[int] = field(default_factory=list)
    daemon_before: int | None = None
    daemon_after: int | None = None
    recovered_s: float | None = None
    requests: int = 0
    failed: int = 0
    failed_after_recovery: int = 0
    doctor_rc: int | None = None
    doctor_verdict: str = ""
    status_rc: int | None = None
    status_verdict: str = ""
    status_attached: int = 0
    status_mps_nodes: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    output_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "output_tail"}


def _wait(predicate: Callable[[], object], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:  # the daemon may be between lives
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} not within {timeout_s}s")


REPLICA_TITLE = "ray::ServeReplica:mps-scenario:model-rec"  # app_name in tests/mps.py


def replica_pids() -> set[int]:
    """Live model replicas, by the process title Ray gives them."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            continue
        if cmdline.startswith(REPLICA_TITLE.encode()) and state != "Z":
            found.add(int(entry.name))
    return found


def _all_attached(control: MpsControl, replicas: int, old: set[int]) -> bool:
    """Every live replica (and ``replicas`` of them, none of ``old``) is an MPS client."""
    clients = {pid for pids in control.clients().values() for pid in pids}
    live = replica_pids()
    return len(live) == replicas and live <= clients and not (live & old)


def _cli(tmp: Path, env: dict[str, str], command: str, *extra: str) -> Any:
    """``mpsserve COMMAND --config service.yaml --json`` as an operator runs it."""
    argv = [sys.executable, "-m", "mpsserve.ops.cli", command, "--config", "service.yaml", "--json"]
    return subprocess.run(
        [*argv, *extra],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def kill_daemon(seen: Observed, env: dict[str, str]) -> None:
    """The daemon SIGKILLed: its server dies, every client's context with it."""
    os.kill(seen.daemon_before or 0, signal.SIGKILL)


def client_fault(seen: Observed, env: dict[str, str]) -> None:
    """One replica's next request faults its GPU (mpsserve/model/runtime/injected.py; simulated
    without CUDA): every client of the server must go, the server itself stays."""
    trigger = Path(env["MPSSERVE_INJECT_FAULT_FILE"])
    trigger.with_suffix(".partial").write_text("fault address\n")
    trigger.with_suffix(".partial").rename(trigger)


def run(
    tmp: Path,
    config: dict[str, Any],
    replicas: int,
    env: dict[str, str],
    timeout_s: float = 240,
    strike: Callable[[Observed, dict[str, str]], None] = kill_daemon,
) -> Observed:
    (tmp / "service.yaml").write_text(yaml.safe_dump(config))
    mps = config["mps"]
    control = MpsControl(  # takes the node's turns like the replicas and the guardian
        Path(mps["pipe_dir"]),
        Path(mps["log_dir"]),
        mps["control_binary"],
        lock_file=Path(mps["state_dir"]) / CONTROL_LOCK_FILE,
        retry_s=30.0,  # the observer waits out a stand-in slowed by a loaded CI machine
    )
    port = config["ingress"]["http_port"]
    seen = Observed()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mpsserve.ops.cli",
            "serve",
            "--config",
            "service.yaml",
            "--rows",
            "64",
        ],
        cwd=tmp,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    load = Load(f"http://127.0.0.1:{port}/v2/models/rec/infer", b"")
    try:
        banner = read_until(proc, "Ctrl-C stops", timeout_s)
        address = re.search(r"Ray address:\s+(\S+)", banner)
        _wait(lambda: _all_attached(control, replicas, set()), 60, "every replica attached")
        seen.clients_before, seen.daemon_before = control.clients(), control.daemon_pid()
        seen.replicas_before = sorted(replica_pids())
        load.body = (tmp / ".mpsserve" / "request-rec.json").read_bytes()
        load.start()
        time.sleep(3)
        old = set(seen.replicas_before)
        strike(seen, env)
        seen.recovered_s = _wait(
            lambda: _all_attached(control, replicas, old),
            timeout_s,
            "every replica re-attached to a new server",
        )
        seen.clients_after, seen.daemon_after = control.clients(), control.daemon_pid()
        seen.replicas_after = sorted(replica_pids())
        recovered_at = time.monotonic()
        time.sleep(5)
        load.stop.set()
        load.join(60)
        seen.requests = len(load.outcomes)
        seen.failed = sum(1 for o in load.outcomes if not o.ok)
        seen.failed_after_recovery = sum(
            1 for o in load.outcomes if not o.ok and o.at > recovered_at + 1
        )
        doctor = _cli(tmp, env, "doctor")
        seen.doctor_rc = doctor.returncode
        seen.doctor_verdict = json.loads(doctor.stdout)["verdict"]
        # The daemon lists a new replica as its client from the process's start; the replica
        # serves only after its model loads: status is asked until it is OK (bounded).
        deadline = time.monotonic() + STATUS_WAIT_S
        while True:
            status = _cli(tmp, env, "status", *(["--address", address[1]] if address else []))
            if status.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        seen.status_rc = status.returncode
        report = json.loads(status.stdout) if status.stdout.strip().startswith("{") else {}
        seen.status_verdict = report.get("verdict", status.stderr[-500:])
        seen.status_attached = sum(
            1 for r in report.get("replicas", []) if (r.get("mps") or {}).get("attached")
        )
        seen.status_mps_nodes = report.get("mps_nodes") or {}
    finally:
        load.stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                rest, _ = proc.communicate(timeout=120)
                seen.output_tail = rest[-3000:]
            except subprocess.TimeoutExpired:
                proc.kill()
        seen.exit_code = proc.returncode
        if control.running():  # never leave a daemon behind
            control.quit()
    return seen
