"""A replica's ``max_ongoing_requests`` holds across ingresses: `mpsserve serve` runs three
ingress replicas and one model replica that takes 2 requests at a time; 24 clients, each on
a new connection per request (the kernel spreads them over the ingresses, each of which may
send 2), would put up to 6 on the replica. Its data port answers the excess ``full``; the
ingresses retry, every request is served, and the replica's peak stays at 2."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.integration.conftest import PORT_OFFSET
from tests.processes import Service, service_config

HTTP = 26510 + PORT_OFFSET
LIMIT = 2
CLIENTS = 24
LOAD_S = 8.0


def _load(url: str, body: bytes) -> list[int]:
    codes: list[int] = []
    deadline = time.monotonic() + LOAD_S
    while time.monotonic() < deadline:
        response = requests.post(url, data=body, headers={"Connection": "close"}, timeout=60)
        codes.append(response.status_code)
    return codes


def test_in_flight_never_exceeds_the_limit_across_ingresses(tf_store: Path, tmp_path: Path) -> None:
    placement = {"cpu_replicas": 1, "cpus_per_replica": 0.5, "max_ongoing_requests": LIMIT}
    config = service_config(tf_store, HTTP, "bound", ingress_replicas=3, placement=placement)
    with Service(tmp_path, config) as svc:
        body = svc.request_body()
        with ThreadPoolExecutor(CLIENTS) as pool:
            runs = list(pool.map(lambda _: _load(f"{svc.url}/rec/infer", body), range(CLIENTS)))
        report = svc.status()
    codes = [code for run in runs for code in run]
    assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    [replica] = report["replicas"]
    assert len(report["ingresses"]) == 3
    in_flight = replica["in_flight"]
    assert in_flight["limit"] == LIMIT
    assert in_flight["peak"] <= LIMIT, in_flight
    assert in_flight["overloaded"] > 0, in_flight  # the ingresses together did exceed it
