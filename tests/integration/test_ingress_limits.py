"""Issue 14's abuse cases against the running service (items 2, 3): each is refused, the
ingress's memory stays bounded and good requests keep being answered meanwhile.

The session's service runs with header and body timeouts of 2 s and 48 requests in flight
per ingress (conftest.py). Everything is loopback and bounded: 200 slowloris sockets, not
20,000.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from mpsserve.ops.demo import make_request
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL
from tests.integration.conftest import HTTP_PORT

TIMEOUT_S = 2.0  # ingress.limits.header_timeout_s and body_idle_timeout_s in conftest
GOOD_BODY = encode_json_request(make_request(SMALL, rows=8, seed=3))
RSS_BUDGET_MB = 200  # growth of any ingress process allowed during one abuse case


def ingress_pids(port: int = HTTP_PORT) -> list[int]:
    """Processes listening on the HTTP port (the ingress replicas, SO_REUSEPORT)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(f"socket:[{fields[9]}]")
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    pids.append(int(proc.name))
    return pids


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Watch:
    """Good requests sent one after another, and the ingresses' peak RSS, while a case runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pids = ingress_pids()
        self.rss0 = {pid: rss_mb(pid) for pid in self.pids}
        self.peak = dict(self.rss0)
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._good), threading.Thread(target=self._rss)]

    def _good(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = requests.post(self.url, data=GOOD_BODY, timeout=30)
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    def _rss(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    self.peak[pid] = max(self.peak[pid], rss_mb(pid))
            time.sleep(0.1)

    def __enter__(self) -> Watch:
        assert self.pids, "no ingress process found listening on the HTTP port"
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def check(self, what: str) -> None:
        growth = max(self.peak[pid] - self.rss0[pid] for pid in self.pids)
        p99 = float(np.percentile(self.latencies, 99)) if self.latencies else 0.0
        print(
            f"{what}: {len(self.latencies)} good requests, median "
            f"{statistics.median(self.latencies) * 1000:.0f} ms, P99 {p99 * 1000:.0f} ms; "
            f"ingress RSS growth {growth:.0f} MB"
        )
        assert not self.failures, self.failures[:3]
        assert len(self.latencies) >= 3 and p99 < 2.0
        assert growth < RSS_BUDGET_MB


@pytest.fixture
def watch(base_url: str) -> Iterator[Watch]:
    with Watch(f"{base_url}/v2/models/rec/infer") as watching:
        yield watching


def connect() -> socket.socket:
    return socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_closed(sockets: list[socket.socket], within_s: float) -> tuple[float, list[bytes]]:
    """Seconds until every socket was closed by the server, and what each received."""
    started, answers = time.monotonic(), []
    for sock in sockets:
        sock.settimeout(max(within_s - (time.monotonic() - started), 0.1))
        answers.append(read_all(sock))
        sock.close()
    return time.monotonic() - started, answers


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def test_slowloris_headers_are_cut_at_the_header_timeout(watch: Watch) -> None:
    sockets = [connect() for _ in range(200)]
    for sock in sockets:
        sock.sendall(b"POST /v2/models/rec/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    elapsed, answers = wait_closed(sockets, TIMEOUT_S + 10)
    time.sleep(0.5)
    watch.check(f"200 slowloris sockets cut in {elapsed:.1f} s")
    assert elapsed < TIMEOUT_S + 5
    assert all(status_of(a) == 408 for a in answers)


def test_bodies_that_stop_arriving_are_cut_without_allocating_the_claim(watch: Watch) -> None:
    sockets = [connect() for _ in range(40)]
    head = b"POST /v2/models/rec/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 15000000\r\n\r\n"
    for sock in sockets:  # 40 x 15 MB claimed (under the 16 MB limit), 20 KB sent
        sock.sendall(head + b"{" * 20_000)
    elapsed, answers = wait_closed(sockets, TIMEOUT_S + 10)
    watch.check(f"40 stalled 15 MB bodies cut in {elapsed:.1f} s")
    assert elapsed < TIMEOUT_S + 5 and all(status_of(a) == 408 for a in answers)


@pytest.mark.parametrize("path", ["/v2/models/rec/infer", "/v1/models/rec:predict"])
def test_chunked_gigabyte_is_refused_at_the_limit(watch: Watch, path: str) -> None:
    chunk = b"100000\r\n" + b"1" * (1 << 20) + b"\r\n"
    with connect() as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 1024:  # up to 1 GiB
                sock.sendall(chunk)
                sent += 1
        raw = read_all(sock)
    time.sleep(1)  # the refusal is quick: let good requests run on a little
    watch.check(f"chunked upload to {path} refused after {sent} MiB sent")
    assert status_of(raw) == 413 and b"the limit is" in raw
    assert sent < 64  # cut off soon after the 16 MiB limit, not read to the end


def test_huge_header_is_431_and_others_keep_their_latency(watch: Watch) -> None:
    with connect() as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Big: ")
        with contextlib.suppress(OSError):
            for _ in range(2048):  # up to 128 MiB of one header
                sock.sendall(b"a" * 65536)
        raw = read_all(sock)
    time.sleep(1)  # the refusal is quick: let good requests run on a little
    watch.check("128 MiB header")
    assert status_of(raw) == 431


def test_load_beyond_the_in_flight_bound_is_shed_at_once(base_url: str) -> None:
    body = encode_json_request(make_request(SMALL, rows=200, seed=5))

    def one(_: int) -> tuple[int, float, str | None]:
        started = time.monotonic()
        response = requests.post(f"{base_url}/v2/models/rec/infer", data=body, timeout=60)
        return response.status_code, time.monotonic() - started, response.headers.get("Retry-After")

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(400)))
    shed = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    print(
        f"200 clients, 400 requests: {len(served)} served (P50/P99 "
        f"{np.percentile([r[1] for r in served], 50):.2f}/"
        f"{np.percentile([r[1] for r in served], 99):.2f} s), {len(shed)} shed (P50/P99 "
        f"{np.percentile([r[1] for r in shed], 50) if shed else 0:.2f}/"
        f"{np.percentile([r[1] for r in shed], 99) if shed else 0:.2f} s)"
    )
    assert len(served) + len(shed) == len(results) and served and shed
    assert all(r[2] == "1" for r in shed)
    # "At once" is relative: a shed request never waits behind the served ones (a locally
    # measured run: 0.58 s shed vs 1.34 s served at the median). Absolute
    # times on a 2-core box mostly measure this client's own 200 threads (CI saw a 1.15 s
    # median shed while the served P99 was 5.1 s), so compare with what was served.
    shed_median = np.percentile([r[1] for r in shed], 50)
    served_median = np.percentile([r[1] for r in served], 50)
    assert shed_median < 0.7 * served_median, (shed_median, served_median)


def test_crlf_request_ids_get_a_normal_answer(base_url: str) -> None:
    url = f"{base_url}/v2/models/rec/infer"
    body = json.loads(GOOD_BODY)
    body["id"] = "abc\r\nX-Injected: 1"
    response = requests.post(url, json=body, timeout=30)
    assert response.status_code == 200 and "X-Injected" not in response.headers
    assert "\r" not in response.headers["X-Request-ID"]
    with connect() as sock:
        sock.sendall(
            b"POST /v2/models/rec/infer HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\rb\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(GOOD_BODY), GOOD_BODY)
        )
        assert status_of(read_all(sock)) in (200, 400)  # an answer, never silence


def test_huge_json_integer_is_a_400_naming_the_input(base_url: str) -> None:
    body = json.loads(GOOD_BODY)
    text = json.dumps(body).replace(str(body["inputs"][0]["data"][0]), "7" * 5000, 1)
    response = requests.post(f"{base_url}/v2/models/rec/infer", data=text, timeout=30)
    assert response.status_code == 400
    assert f'"{body["inputs"][0]["name"]}"' in response.json()["error"]


def test_framework_pages_are_not_served(base_url: str) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        response = requests.get(base_url + path, timeout=10)
        assert response.status_code == 404 and "error" in response.json()


def grpc_inputs() -> list[triton_grpc.InferInput]:
    req = make_request(SMALL, rows=4, seed=9)
    inputs = []
    for name, array in req.items():
        item = triton_grpc.InferInput(
            name, list(array.shape), "FP32" if name == "dense" else "INT64"
        )
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def test_grpc_crlf_request_id_and_huge_model_name(grpc_address: str) -> None:
    client = triton_grpc.InferenceServerClient(grpc_address)
    result = client.infer("rec", grpc_inputs(), request_id="abc\r\ninjected")
    assert result.as_numpy("score").shape == (4,)
    with pytest.raises(InferenceServerException) as info:
        client.infer("m" * (1 << 20), grpc_inputs())
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "m" * 64 + "..." in info.value.message()


def test_silent_grpc_connection_is_closed(grpc_address: str) -> None:
    host, port = grpc_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        started = time.monotonic()
        read_all(sock)  # no HTTP/2 preface: the handshake deadline closes it
    assert time.monotonic() - started < TIMEOUT_S + 5
