"""A model replica that stops answering, under steady load, driven as an operator would:
`mpsserve serve` runs two model replicas; one is frozen (SIGSTOP, as a hung GPU or a
stuck host would leave it) for 15 s while two clients send requests one after another.
Requests already sent to it are retried on the other replica after the per-attempt timeout
(~1 s, far below the 30 s deadline), none fails, and after SIGCONT it serves again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.processes import read_until

HTTP, GRPC = 32410, 32411
FREEZE_S = 15.0


def service(store: Path) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "rec",
                "store": str(store),
                "intra_op_threads": 1,
                "placement": {"cpu_replicas": 2, "cpus_per_replica": 0.5},
            }
        ],
        "ray": {"num_cpus": 2, "dashboard": False, "app_name": "hung"},
        "ingress": {
            "http_port": HTTP,
            "grpc_port": GRPC,
            "host": "127.0.0.1",
            "replicas": 1,
            "cpus_per_replica": 0.5,
        },
    }


@dataclass(frozen=True)
class Sent:
    at: float  # time.monotonic() when sent
    seconds: float
    status: int  # 0: no answer (connection error, client timeout)


class TimedLoad(threading.Thread):
    """One request at a time in a loop, each timed."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.sent: list[Sent] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            request = urllib.request.Request(self.url, data=self.body, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=40) as response:
                    response.read()
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except Exception:
                status = 0
            self.sent.append(Sent(started, time.monotonic() - started, status))


def replica_pids(meta_url: str, timeout_s: float) -> set[int]:
    """The pids of the replicas answering ``metadata`` (the ingress picks one at random
    among the least busy), until two have been seen."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < 2 and time.monotonic() < deadline:
        pids.add(requests.get(meta_url, timeout=10).json()["pid"])
    return pids


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_a_frozen_replica_costs_no_request(tf_store: Path, tmp_path: Path) -> None:
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(service(tf_store)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    cli = [sys.executable, "-m", "mpsserve.cli"]
    proc = subprocess.Popen(
        [*cli, "serve", "--config", "service.yaml", "--rows", "64"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    meta_url = f"http://127.0.0.1:{HTTP}/v2/models/rec"
    frozen: int | None = None
    loads: list[TimedLoad] = []
    try:
        read_until(proc, "Ctrl-C stops", 300)
        pids = replica_pids(meta_url, 60)
        assert len(pids) == 2, f"saw replicas {pids}"
        body = (tmp_path / ".mpsserve/request-rec.json").read_bytes()
        loads = [TimedLoad(f"{meta_url}/infer", body) for _ in range(2)]
        for load in loads:
            load.start()
        time.sleep(3)
        frozen = min(pids)
        froze_at = time.monotonic()
        os.kill(frozen, signal.SIGSTOP)
        time.sleep(FREEZE_S)
        os.kill(frozen, signal.SIGCONT)
        thawed_at, frozen = time.monotonic(), None
        time.sleep(3)
        for load in loads:
            load.stop.set()
        for load in loads:
            load.join(60)
        back = replica_pids(meta_url, 30)  # it re-registers and is routed to again
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        for load in loads:
            load.stop.set()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest[-3000:]
    sent = [s for load in loads for s in load.sent]
    failed = [s for s in sent if s.status != 200]
    during = [s.seconds for s in sent if froze_at - 1 <= s.at <= thawed_at]
    before = [s.seconds for s in sent if s.at < froze_at - 1]
    hit = [seconds for seconds in during if seconds > 0.5]  # those sent to the frozen one
    print(  # the figures the issue asks for (pytest -s shows them)
        f"\n{len(sent)} requests, {len(failed)} failed; steady P99 "
        f"{quantile(before, 0.99) * 1000:.0f} ms; during the freeze {len(during)} requests, "
        f"P99 {quantile(during, 0.99) * 1000:.0f} ms, max {max(during) * 1000:.0f} ms; "
        f"over 0.5 s: {sorted(round(seconds, 2) for seconds in hit)}"
    )
    assert failed == []
    assert max(during) < 5.0, "a request waited on the frozen replica"
    assert back == pids
    assert len(during) > 20  # the load went on during the freeze
