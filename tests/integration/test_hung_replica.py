"""A model replica that stops answering, under steady load, driven as an operator would:
`mpsserve serve` runs two model replicas; one is frozen (SIGSTOP, as a hung GPU or a
stuck host would leave it) for 15 s while two clients send requests one after another.
Requests already sent to it are retried on the other replica after the per-attempt timeout
(~1 s, far below the 30 s deadline), none fails, and after SIGCONT it serves again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.integration.conftest import PORT_OFFSET
from tests.processes import Load, Service, service_config

HTTP = 26410 + PORT_OFFSET
FREEZE_S = 15.0


def replica_pids(svc: Service, timeout_s: float) -> set[int]:
    """The pids of the replicas answering ``metadata`` on their data ports (``mpsserve
    status``, through Ray: public metadata shows no pid), until two answer."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < 2 and time.monotonic() < deadline:
        pids = {r["pid"] for r in svc.status()["replicas"] if "error" not in r}
    return pids


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_a_frozen_replica_costs_no_request(tf_store: Path, tmp_path: Path) -> None:
    config = service_config(tf_store, HTTP, "hung", model_replicas=2, ingress_replicas=1)
    frozen: int | None = None
    loads: list[Load] = []
    with Service(tmp_path, config) as svc:
        meta_url = f"{svc.url}/rec"
        try:
            pids = replica_pids(svc, 60)
            assert len(pids) == 2, f"saw replicas {pids}"
            loads = [Load(f"{meta_url}/infer", svc.request_body()) for _ in range(2)]
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
        finally:
            if frozen is not None:
                os.kill(frozen, signal.SIGCONT)
            for load in loads:
                load.stop.set()
            for load in loads:
                load.join(60)
        back = replica_pids(svc, 30)  # it re-registers and answers again
    assert svc.returncode == 0, svc.output[-3000:]
    sent = [o for load in loads for o in load.outcomes]
    failed = [o for o in sent if not o.ok]
    during = [o.seconds for o in sent if froze_at - 1 <= o.sent <= thawed_at]
    before = [o.seconds for o in sent if o.sent < froze_at - 1]
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
