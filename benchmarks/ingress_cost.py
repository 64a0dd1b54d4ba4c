"""The ingress hop's CPU per request, measured without Ray or a GPU.

The ingress's own parts (uvicorn with the guard, the KServe v2 route, the ``DataPlane``, the
``Router`` and ``ReplicaBackend`` over the authenticated data port) run in this process as the
ingress deployment wires them; a stub replica in another process answers every frame with the
scores a model would return, at once. ``benchmarks.loadgen`` drives it over HTTP (binary
tensors, 2000-row demo requests by default) and reports this process's CPU per request
(``server CPU ms/req``): what one request costs an ingress, so that changes to the hop can be
compared on any machine. Run it on an otherwise idle machine; compare within one run.

    python -m benchmarks.ingress_cost [--concurrency 4] [--duration-s 10] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mpsserve.config import IngressConfig
from mpsserve.ingress.backends import ReplicaBackend
from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.guard import GuardLimits, guarded_protocol
from mpsserve.ingress.http import create_http_app
from mpsserve.ingress.replica_server import ReplicaServer, new_event_loop
from mpsserve.ingress.router import Router
from mpsserve.protocol import frame
from mpsserve.protocol.handshake import Keyring

METADATA = {"versions": ["1"], "inputs": [], "outputs": [{"name": "score", "dtype": "float32"}]}


def _answer(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
    if header.get("op") == "metadata":
        return frame.encode({"ok": True, "metadata": METADATA})
    tensors = frame.tensors(header, body)
    rows = next(iter(tensors.values())).shape[0] if tensors else 0
    scores = np.zeros((rows, 1), dtype=np.float32)
    return frame.encode({"ok": True, "version": "1"}, {"score": scores})


def _replica(ring: Keyring, ports: Any) -> None:
    server = ReplicaServer(_answer, threads=2, host="127.0.0.1", keys=lambda: ring)
    ports.put(server.start())
    threading.Event().wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve_ingress(ring: Keyring, replica_port: int, http_port: int) -> None:
    import uvicorn

    config = IngressConfig()
    max_bytes = int(config.max_request_mb * 2**20)
    router = Router({"rec": 64}, keys=lambda: ring, wait_for_replica_s=5.0)
    router.update(
        "rec", [{"key": "stub", "model": "rec", "host": "127.0.0.1", "port": replica_port}]
    )
    plane = DataPlane({"rec": ReplicaBackend("rec", router)}, max_bytes, 30.0, max_in_flight=256)
    guard = GuardLimits.of(config.limits, 1024, max_bytes)
    server = uvicorn.Server(
        uvicorn.Config(
            create_http_app(plane),
            host="127.0.0.1",
            port=http_port,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            http=guarded_protocol(guard),
            loop="none",
            timeout_keep_alive=math.ceil(config.limits.keepalive_timeout_s),
        )
    )
    loop = new_event_loop()
    threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--access-log",
        type=Path,
        help="write the access log to this file, as a Serve replica's file handler does "
        "(without it the log is off, as with MPSSERVE_ACCESS_LOG=off)",
    )
    args = parser.parse_args()
    if args.access_log is not None:
        handler = logging.FileHandler(args.access_log)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s -- %(message)s"))
        access = logging.getLogger("mpsserve.access")
        access.setLevel(logging.INFO)
        access.addHandler(handler)
        access.propagate = False
    ring = Keyring.generate()
    ports: Any = mp.get_context("spawn").Queue()
    replica = mp.get_context("spawn").Process(target=_replica, args=(ring, ports), daemon=True)
    replica.start()
    http_port = _free_port()
    _serve_ingress(ring, ports.get(timeout=30), http_port)
    time.sleep(1.0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.loadgen",
                "--url",
                f"http://127.0.0.1:{http_port}",
                "--model",
                "rec",
                "--rows",
                str(args.rows),
                "--label",
                "ingress",
                "--warmup-s",
                "2",
                "--concurrency",
                str(args.concurrency),
                "--duration-s",
                str(args.duration_s),
                "--processes",
                str(args.processes),
                "--out",
                str(out),
                # this process (the stub replica is a spawned child with another cmdline)
                "--server-pids-pattern",
                r"-m benchmarks\.ingress_cost",
            ],
            check=True,
        )
        step = json.loads(out.read_text())["steps"][-1]
    replica.terminate()
    cpu = step["server_cpu_s_per_req"]
    print(
        f"ingress: {step['qps']} req/s, {'n/a' if cpu is None else f'{1000 * cpu:.3f}'} ms of "
        f"ingress CPU per request, P50 {step['p50_ms']} ms, errors {step['errors']}"
    )


if __name__ == "__main__":
    main()
